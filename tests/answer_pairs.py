"""A labelled table of answer pairs: equal (the math grader accepts one for the other, either way round) or not.

Shared by the vote's tests; each row is (category, a, b, equal).
"""

from __future__ import annotations

PAIRS: list[tuple[str, str, str, bool]] = [
    # integers
    ("integer", "42", "042", True),
    ("integer", "1,000", "1000", True),
    ("integer", "10^{3}", "1000", True),
    ("integer", "2^{10}", "1024", True),
    ("integer", r"\text{42}", "42", True),
    ("integer", "42.", "42", True),
    ("integer", "-7", "-7.0", True),
    ("integer", "12", "1 2", False),
    ("integer", "3,4", "34", False),
    ("integer", "42", "24", False),
    ("integer", "-7", "7", False),
    ("integer", "10^{3}", "103", False),
    # fractions and decimals
    ("fraction", r"\frac12", "0.5", True),
    ("fraction", r"\dfrac{3}{4}", "3/4", True),
    ("fraction", "-3/6", r"-\frac{1}{2}", True),
    ("fraction", r"\frac{2}{4}", r"\tfrac12", True),
    ("fraction", "0.25", r"\frac{1}{4}", True),
    ("fraction", "0.5", "0.05", False),
    ("fraction", r"\frac12", r"\frac21", False),
    ("fraction", "1/3", "3", False),
    # radicals and constants
    ("radical", r"\sqrt2/2", r"\frac{\sqrt2}{2}", True),
    ("radical", r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True),
    ("radical", r"\sqrt{8}", r"2\sqrt{2}", True),
    ("radical", r"\sqrt3", r"\sqrt{3}", True),
    ("radical", r"\pi/2", r"\frac{\pi}{2}", True),
    ("radical", r"2\sqrt{3}", r"\sqrt{12}", True),
    ("radical", r"\sqrt{2}", r"\sqrt{3}", False),
    ("radical", r"\sqrt{2}/2", r"\sqrt{2}", False),
    ("radical", r"\pi", "3", False),
    # degrees
    ("degrees", r"30^\circ", "30", True),
    ("degrees", r"30^{\circ}", r"30^\circ", True),
    ("degrees", "45°", "45", True),
    ("degrees", r"30^\circ", "60", False),
    ("degrees", r"90^{\circ}", r"45^{\circ}", False),
    # sets
    ("set", r"\{1,2\}", r"\{2,1\}", True),
    ("set", r"\{1, 2, 3\}", r"\{3,2,1\}", True),
    ("set", r"\{1,2\}", r"\{1,3\}", False),
    ("set", r"\{1,2\}", r"\{1,2,3\}", False),
    # tuples
    ("tuple", "(1,2)", r"\left(1, 2\right)", True),
    ("tuple", "(1, 2, 3)", "(1,2,3)", True),
    ("tuple", "(2,1)", "(1, 2)", False),
    ("tuple", "(1,2,3)", "(1,2)", False),
    # intervals
    ("interval", "[0,1)", r"\left[0, 1\right)", True),
    ("interval", r"(-\infty, 2]", r"(-\infty,2]", True),
    ("interval", "[0,1)", "[0,1]", False),
    ("interval", "(0,1)", "[0,1]", False),
    # choices
    ("choice", "(A)", "A", True),
    ("choice", r"\text{(B)}", "B", True),
    ("choice", r"\textbf{(C)}", "C", True),
    ("choice", "B", "C", False),
    ("choice", "(A)", "(D)", False),
    # equations and expressions
    ("equation", "x=5", "5", True),
    ("equation", "k=5", "5", True),
    ("equation", "y=2x+1", "2x+1", True),
    ("equation", "x^2+2x+1", "(x+1)^2", True),
    ("equation", "2x", "x2", True),
    ("equation", "x=5", "x=6", False),
    ("equation", "x+1", "x-1", False),
    ("equation", "x^2", "2x", False),
    # text and symbols
    ("text", r"\text{yes}", "yes", True),
    ("text", r"\text{ Yes }", r"\text{Yes}", True),
    ("text", r"\leftarrow", r"\rightarrow", False),
    ("text", r"\text{yes}", r"\text{no}", False),
    ("text", r"\text{odd}", r"\text{even}", False),
    ("text", r"\mathrm{odd}", "odd", True),
]
