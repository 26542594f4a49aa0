"""``python -m markov_rsa`` is the ``rsa`` command."""

from markov_rsa.cli.app import main

main()
