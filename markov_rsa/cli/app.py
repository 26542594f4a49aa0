"""The ``rsa`` command: a thin layer that parses flags, builds library objects and renders events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

try:  # recent typer vendors click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - typer with click as a dependency
    from click import exceptions as click_errors  # type: ignore[no-redef]

from markov_rsa.cli import options as o
from markov_rsa.cli.logs import LogFile, LogLevel, setup_logging
from markov_rsa.errors import ConfigError, MarkovRSAError
from markov_rsa.evals.benchmarks import BENCHMARKS, benchmark
from markov_rsa.extras import missing_extra
from markov_rsa.rsa.config import TaskName

app = typer.Typer(
    name="rsa",
    help="Markovian Recursive Self-Aggregation: test-time compute over a local model or an OpenAI-compatible endpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")
#: ``rsa solve``'s exit code when the run ended without an answer (usage errors are 2).
NO_ANSWER_EXIT = 3


def _version(value: bool) -> None:
    if value:
        from markov_rsa import __version__

        typer.echo(f"markov-rsa {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Markovian RSA: solve problems, run benchmarks, render reports, serve an OpenAI-compatible endpoint."""


def print_error(message: object) -> None:
    """One ``error:`` line on stderr; the message is printed as text (a path or a value the user typed may
    hold ``[...]``, which rich would otherwise read as markup, eat or fail on)."""
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def run_cli(body: Callable[[], T], *, interrupted: str = "interrupted") -> T:
    """Run a command body; library errors, and an optional package that is not installed, become one line
    on stderr with the error's exit code."""
    try:
        return body()
    except MarkovRSAError as exc:
        print_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except ModuleNotFoundError as exc:
        missing = missing_extra(exc)
        if missing is None:
            raise
        print_error(missing)
        raise typer.Exit(missing.exit_code) from None
    except KeyboardInterrupt:
        Console(stderr=True).print(interrupted, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def read_problem(problem: str) -> str:
    text = sys.stdin.read() if problem == "-" else problem
    if not text.strip():
        raise ConfigError("problem", "the problem text is empty")
    return text


@app.command()
@o.rsa_options
def solve(
    problem: Annotated[str, typer.Argument(help="The problem to solve; '-' reads it from stdin.")],
    rsa: dict[str, Any] | None = None,
    task: Annotated[TaskName | None, typer.Option(help="Prompt set and answer format.")] = None,
    backend: o.BackendKind = "auto",
    model: o.Model = None,
    base_url: o.BaseUrl = None,
    api_key_env: o.ApiKeyEnv = None,
    tokenizer: o.Tokenizer = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    max_concurrency: o.MaxConcurrency = None,
    timeout: o.Timeout = 600.0,
    routing: o.RoutingFlag = "affinity",
    json_output: Annotated[bool, typer.Option("--json", help="Print the full result as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the answer.")] = False,
    log_level: LogLevel = "warning",
    log_file: LogFile = None,
) -> None:
    """Solve one problem with Markovian RSA and print the answer (details go to stderr)."""
    options = dict(rsa or {})
    preset = options.pop("preset", None)
    fields = {**options, "task": task}
    backend_opts = o.backend_options(locals())

    def body() -> None:
        setup_logging(log_level, log_file)
        text = read_problem(problem)
        config = o.build_config(preset, backend_opts.embedded, **fields)
        backend = o.build_backend(backend_opts, announce=not quiet)
        result = asyncio.run(_solve(backend, config, text, quiet))
        err = Console(stderr=True)
        if not quiet:
            from markov_rsa.cli.render import round_table, summary_line

            err.print(round_table(result))
            err.print(summary_line(result), highlight=False)
        if json_output:
            sys.stdout.write(result.to_json(indent=2) + "\n")
        elif result.config.final == "population":
            for c in result.population:
                sys.stdout.write(f"{c.answer if c.answer is not None else c.text.strip()}\n")
        elif result.answer is None:  # never some candidate's text in place of an answer
            err.print(result.why_no_answer(), highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(NO_ANSWER_EXIT)
        else:
            sys.stdout.write(f"{result.answer}\n")

    run_cli(body)


async def _solve(backend: Any, config: Any, problem: str, quiet: bool) -> Any:
    from markov_rsa.cli.render import follow
    from markov_rsa.rsa.engine import MarkovianRSA

    try:
        engine = MarkovianRSA(backend, config)
        console = Console(stderr=True, quiet=quiet)
        async with contextlib.aclosing(engine.stream(problem)) as events:
            return await follow(events, console, quiet=quiet)
    finally:
        await backend.aclose()


@app.command("eval")
@o.rsa_options
def eval_command(
    task: Annotated[str, typer.Argument(help="The benchmark: " + "; ".join(
        f"{b.name}: {b.description}" for b in BENCHMARKS.values()) + ".")],
    out: Annotated[Path, typer.Option(help="Run directory; re-running on it resumes where it stopped.")],
    rsa: dict[str, Any] | None = None,
    name: Annotated[str | None, typer.Option(help="The run's name in reports (default: OUT's name).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the run's summary as JSON on stdout.")] = False,
    limit: Annotated[int | None, typer.Option(help="Only the first N problems.")] = None,
    repeats: Annotated[int, typer.Option(help="Independent runs per problem.")] = 1,
    concurrency: Annotated[int, typer.Option(help="Problems solved at once.")] = 4,
    data_dir: Annotated[
        Path | None, typer.Option(help="Local JSONL copies of the sets instead of the Hub ($MARKOV_RSA_DATA_DIR).")
    ] = None,
    release: Annotated[str | None, typer.Option(
        help="LiveCodeBench release (v1..v6; default v6), on the Hub or a local copy in the Hub's layout.")] = None,
    unsafe_no_sandbox: Annotated[bool, typer.Option(
        "--unsafe-no-sandbox",
        help="LiveCodeBench: run untrusted programs without bubblewrap (rlimits only; a program can escape).",
    )] = False,
    force: Annotated[bool, typer.Option(
        help="Resume OUT even though it holds a run of another model, backend, prompt set or version.")] = False,
    progress_every: Annotated[float, typer.Option(
        help="Seconds between plain progress lines when stderr is not a terminal (nohup, job logs).")] = 30.0,
    total_token_budget: Annotated[int | None, typer.Option(
        help="One budget of generated tokens across all problems: after each problem's round 0, further rounds "
             "go first to the problems whose populations agree least; spending goes to OUT/schedule.json.")] = None,
    since: Annotated[str | None, typer.Option(help="LiveCodeBench: contest_date on or after YYYY-MM-DD.")] = None,
    until: Annotated[str | None, typer.Option(help="LiveCodeBench: contest_date on or before YYYY-MM-DD.")] = None,
    backend: o.BackendKind = "auto",
    model: o.Model = None,
    base_url: o.BaseUrl = None,
    api_key_env: o.ApiKeyEnv = None,
    tokenizer: o.Tokenizer = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    max_concurrency: o.MaxConcurrency = None,
    timeout: o.Timeout = 600.0,
    routing: o.RoutingFlag = "affinity",
    log_level: LogLevel = "warning",
    log_file: LogFile = None,
) -> None:
    """Run a benchmark with Markovian RSA; every candidate is logged to OUT as it finishes."""
    options = dict(rsa or {})
    preset = options.pop("preset", None)
    backend_opts = o.backend_options(locals())

    def body() -> None:
        setup_logging(log_level, log_file)
        from markov_rsa.cli.evaluate import run_evaluation
        from markov_rsa.evals.benchmarks import load_task

        if repeats < 1 or concurrency < 1 or (limit is not None and limit < 1):
            raise ConfigError("limit", "--limit, --repeats and --concurrency must be at least 1")
        if total_token_budget is not None and total_token_budget < 1:
            raise ConfigError("total_token_budget", f"must be a positive number of tokens, got {total_token_budget}")
        if not progress_every > 0:
            raise ConfigError("progress_every", "must be a positive number of seconds")
        chosen = benchmark(task)
        config = o.build_config(preset, backend_opts.embedded, **options, task=chosen.kind)
        if total_token_budget is not None and not config.aggregates:
            raise ConfigError("total_token_budget", "a run of one stage (rounds 0, no final aggregation) has no "
                                                    "later rounds to schedule; set rounds above 0")
        from markov_rsa.evals.log import check_writable

        check_writable(out)
        if chosen.kind == "code" and not unsafe_no_sandbox:
            from markov_rsa.evals.grading.sandbox import Sandbox

            Sandbox()  # refuses at once, before anything is loaded or generated, where isolation cannot work
        problems = load_task(task, data_dir, release=release, since=since, until=until)
        if not problems:
            raise ConfigError("task", f"no {task} problems matched (check --since/--until and --data-dir)")
        backend = o.build_backend(backend_opts)
        code = run_evaluation(task, config, backend, problems, out, limit=limit, repeats=repeats,
                              concurrency=concurrency, isolation="rlimits" if unsafe_no_sandbox else "bwrap",
                              force=force, name=name, total_token_budget=total_token_budget, command=tuple(sys.argv),
                              progress_every=progress_every,
                              data={"data_dir": str(data_dir) if data_dir else os.environ.get("MARKOV_RSA_DATA_DIR"),
                                    "release": release, "since": since, "until": until})
        if json_output:
            from markov_rsa.evals.report import load_run, run_json

            sys.stdout.write(json.dumps(run_json(load_run(out)), indent=2) + "\n")
        raise typer.Exit(code)

    run_cli(body, interrupted="interrupted; finished problems are kept in "
                              f"{out}: run the same command again to resume")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories written by rsa eval.")],
    out: Annotated[Path, typer.Option(help="Directory for report.md, report.html and the plots.")] = Path("report"),
    early_exit: Annotated[list[str] | None, typer.Option(
        metavar="THRESHOLD...",
        help="What consensus early exit at these thresholds would have given, replayed from the logged rounds "
             "without a model: --early-exit 0.8 0.9 1.0.")] = None,
    min_rounds: Annotated[int, typer.Option(help="With --early-exit: the earliest round that may stop.")] = 0,
    log_level: LogLevel = "warning",
    log_file: LogFile = None,
) -> None:
    """Render Markdown and HTML reports (tables and plots) from one or more eval runs."""

    def body() -> None:
        setup_logging(log_level, log_file)
        from markov_rsa.evals.report import write_report

        dirs, thresholds = _thresholds(list(runs), early_exit)
        if min_rounds and not thresholds:
            raise ConfigError("min_rounds", "only applies with --early-exit; give thresholds as well")
        md, page = write_report(dirs, out, thresholds or None, min_rounds)
        Console(stderr=True).print(f"wrote {md} and {page}", highlight=False, markup=False)

    run_cli(body)


@app.command("export")
def export_command(
    run: Annotated[Path, typer.Argument(help="A run directory written by rsa eval.")],
    out: Annotated[Path, typer.Option(help="samples.csv or samples.parquet: one row per candidate.")],
    texts: Annotated[bool, typer.Option(help="Include each candidate's full text and reasoning.")] = True,
    log_level: LogLevel = "warning",
    log_file: LogFile = None,
) -> None:
    """Export a run's samples (every candidate, with its grade and its problem's outcome) to CSV or Parquet;
    in Python, markov_rsa.evals.samples.samples_df(RUN) loads them into pandas."""

    def body() -> None:
        setup_logging(log_level, log_file)
        from markov_rsa.evals.samples import export_samples

        count = export_samples(run, out, texts=texts)
        Console(stderr=True).print(f"wrote {count} samples to {out}", highlight=False)

    run_cli(body)


def _thresholds(runs: list[Path], early_exit: list[str] | None) -> tuple[list[Path], list[float]]:
    """``--early-exit 0.8 0.9 1.0``: the values after the first arrive as run arguments; numbers that name
    no directory are thresholds."""
    values = list(early_exit or [])
    dirs = []
    for run in runs:
        if values and not run.exists() and re.fullmatch(r"\d*\.?\d+", str(run)):
            values.append(str(run))
        else:
            dirs.append(run)
    thresholds = []
    for value in values:
        for part in value.split(","):
            try:
                number = float(part)
            except ValueError:
                raise ConfigError("early_exit", f"thresholds are numbers in (0, 1], got {part!r}") from None
            if not 0 < number <= 1:
                raise ConfigError("early_exit", f"thresholds are shares of the population in (0, 1], got {part}")
            thresholds.append(number)
    return dirs, thresholds


@app.command()
def show(
    run: Annotated[Path, typer.Argument(help="A run directory written by rsa eval.")],
    problem: Annotated[str | None, typer.Argument(help="A problem id: its population round by round.")] = None,
    log_level: LogLevel = "warning",
    log_file: LogFile = None,
) -> None:
    """Print a run's problems, or one problem's population round by round (answers, parents, tails)."""

    def body() -> None:
        setup_logging(log_level, log_file)
        from markov_rsa.cli.show import show_run

        show_run(run, problem, Console())  # the terminal's own width

    run_cli(body)


#: Shortest bearer token ``rsa serve`` accepts: a guessable token is no protection.
MIN_TOKEN_CHARS = 16


@app.command()
@o.rsa_options
def serve(
    rsa: dict[str, Any] | None = None,
    host: Annotated[str, typer.Option(help="Interface to bind; the default keeps the server on this machine.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port (not the upstream's).")] = 8080,
    task: Annotated[str, typer.Option(help="Prompt set for RSA requests: generic, math or code.")] = "generic",
    api_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the bearer token every request must send "
                                      f"(at least {MIN_TOKEN_CHARS} characters).")
    ] = None,
    model_name: Annotated[str | None, typer.Option(help="Model id reported by /v1/models.")] = None,
    backend: o.BackendKind = "auto",
    model: o.Model = None,
    base_url: o.BaseUrl = None,
    upstream_api_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the upstream endpoint's API key.")
    ] = None,
    tokenizer: o.Tokenizer = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    max_concurrency: Annotated[int | None, typer.Option(
        min=1, help="Most upstream requests in flight (remote; default: max-concurrent-runs x population, so "
                    "every admitted run's round goes out at once), or rows in the running batch (local, "
                    "default 16).")] = None,
    timeout: o.Timeout = 600.0,
    routing: o.RoutingFlag = "affinity",
    max_concurrent_runs: Annotated[int, typer.Option(
        help="RSA runs at once; more get HTTP 429 with Retry-After.")] = 16,
    max_population: Annotated[int, typer.Option(help="Largest population a request may ask for.")] = 64,
    max_rounds: Annotated[int, typer.Option(help="Most rounds a request may ask for.")] = 16,
    max_budget: Annotated[int, typer.Option(help="Largest per-rollout or last-stage budget a request may ask for.")
                          ] = 131_072,
    max_final_n: Annotated[int, typer.Option(help="Most final aggregations a request may ask for.")] = 64,
    max_requests_per_run: Annotated[int, typer.Option(
        help="Most upstream requests one run may make (generations x chunks x tries).")] = 4096,
    max_connections: Annotated[int, typer.Option(
        help="Open client connections at most; more are closed at once.")] = 512,
    heartbeat: Annotated[float, typer.Option(
        help="Seconds of silence after which a run sends a keep-alive (a newline before JSON, an SSE comment).")
    ] = 5.0,
    drain_seconds: Annotated[float, typer.Option(
        help="On SIGTERM or Ctrl-C: seconds runs in flight may take to finish before they are cancelled.")] = 30.0,
    log_level: LogLevel = "warning",
    log_file: LogFile = None,
) -> None:
    """Serve an OpenAI-compatible endpoint; requests with extended_compute or rsa_* fields run Markovian RSA.

    The RSA flags (--preset, --population, --time-limit...) set what extended_compute requests run; the
    --max-* flags cap what any request may ask for."""
    import dataclasses

    options = dict(rsa or {})
    preset = options.pop("preset", None)
    backend_opts = o.backend_options(locals(), key_env_param="upstream_api_key_env")
    caps = {"max_concurrent_runs": max_concurrent_runs, "max_population": max_population, "max_rounds": max_rounds,
            "max_budget": max_budget, "max_final_n": max_final_n, "max_requests_per_run": max_requests_per_run,
            "max_connections": max_connections}

    def body() -> None:
        setup_logging(log_level, log_file)
        from markov_rsa.server import ServerLimits, ServerSettings, create_app
        from markov_rsa.server.app import LOOPBACK_HOSTS
        from markov_rsa.server.run import listen
        from markov_rsa.server.run import serve as run_server

        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError("api_key_env", f"environment variable {api_key_env} is not set or empty")
            if len(key) < MIN_TOKEN_CHARS:
                raise ConfigError("api_key_env", f"the token in {api_key_env} has {len(key)} characters; use at "
                                                 f"least {MIN_TOKEN_CHARS} (e.g. openssl rand -hex 24)")
        if host not in LOOPBACK_HOSTS and not key:
            raise ConfigError("host", f"serving on {host} (beyond this machine) needs a bearer token: set one "
                                      "with --api-key-env VAR")
        for name, value in caps.items():
            if value < 1:
                raise ConfigError(name, f"must be at least 1, got {value}")
        for name, seconds in (("heartbeat", heartbeat), ("drain_seconds", drain_seconds)):
            if not seconds > 0:
                raise ConfigError(name, f"must be a positive number of seconds, got {seconds}")
        config = o.build_config(preset, backend_opts.embedded, **options, task=task)
        limits = ServerLimits(**caps)
        if config.population > max_population:
            raise ConfigError("population", f"{config.population} is above --max-population {max_population}")
        chosen = backend_opts
        if chosen.max_concurrency is None and chosen.kind == "openai":
            chosen = dataclasses.replace(chosen, max_concurrency=max_concurrent_runs * config.population)
        backend_obj = o.build_backend(chosen)
        settings = ServerSettings(backend=backend_obj, config=config, api_key=key,
                                  model_name=model_name or backend_obj.info.model, limits=limits, heartbeat=heartbeat)
        sock = listen(host, port)
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        Console(stderr=True).print(
            f"serving {settings.model_name or 'the upstream model'} on http://{shown}:{bound}/v1 (preset "
            f"{config.preset or 'custom'}{', bearer token required' if key else ''})",
            highlight=False, soft_wrap=True, markup=False)
        run_server(create_app(settings), limits, sock=sock, drain_seconds=drain_seconds)

    run_cli(body)


def main() -> None:
    """The ``rsa`` entry point: a usage error (an unknown flag, a value outside a flag's choices) is one
    line on stderr and exit code 2, like every other error the user can fix."""
    try:
        code = app(standalone_mode=False)  # an Exit inside a command comes back as its code
    except click_errors.NoArgsIsHelpError as exc:
        exc.show()
        raise SystemExit(2) from None
    except click_errors.UsageError as exc:
        message = re.sub(r"Invalid value for '([^']+)': (Value error, )?", r"\1: ", exc.format_message())
        print_error(message)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt):
        Console(stderr=True).print("interrupted")
        raise SystemExit(130) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
