"""The ``lorakit`` console script: a thin layer over the same builder and InferenceModel.

Commands::

    lorakit train CONFIG [--set key=value ...] [--output DIR] [--overwrite] [--num-processes N]
    lorakit explain CONFIG [--set key=value ...]
    lorakit eval RUN DATA [--limit N] [--json FILE]
    lorakit generate RUN PROMPT [--max-new-tokens N] [--temperature T] ...   (streams to stdout)
    lorakit chat RUN [--system TEXT]                                          (interactive; /reset, /exit)
    lorakit merge RUN OUT [--no-verify] [--max-shard-size 2GB]
    lorakit quickstart
    lorakit runs [DIR] [--sort COLUMN] [--reverse]                          (a table of the runs under DIR)
    lorakit report RUN [--open]                                             (rebuild the run's report.html)

Errors are one line on stderr and a non-zero exit code (2 for a lorakit error, 1 for anything else);
``--debug`` shows the traceback.

Nothing a config or run directory asks for runs code by surprise: ``--trust-remote-code`` (the model's own
Python code), ``--trust-template-classes`` (an unregistered template class) and ``--allow-pickle`` (pickled
weights) are opt-ins on the commands that read configs or runs. Only argparse is imported up front, so ``lorakit --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lorakit import __version__
from lorakit.errors import ConfigError, LorakitError

__all__ = ["main"]


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="most tokens per reply (default: 256)"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument(
        "--base", default=None, help="put the adapter on this base model instead of the run's"
    )


def _trust_arguments(parser: argparse.ArgumentParser, *, weights: bool) -> None:
    """The opt-ins for running code a config or run directory asks for (all off: nothing runs by surprise)."""
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="run the Python code shipped with the model (transformers' trust_remote_code); needed when "
        "the config or run asks for it",
    )  # fmt: skip
    parser.add_argument(
        "--trust-template-classes", action="store_true",
        help="import and build a prompt template class that is not registered (named in the config or run)",
    )  # fmt: skip
    if weights:
        parser.add_argument(
            "--allow-pickle", action="store_true",
            help="load pickled weights (*.bin) of a directory without safetensors (only if you trust it)",
        )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="Parameter-efficient fine-tuning of open LLMs."
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the pipeline a YAML / JSON config describes")
    train.add_argument("config", help="a .yaml / .json pipeline config (or a run directory to repeat)")
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.lr=1e-4 --set model=./my-model (repeatable)",
    )  # fmt: skip
    train.add_argument("--output", "-o", default=None, help="run directory (default: runs/<config name>)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in the directory")
    train.add_argument(
        "--num-processes", type=int, default=None, metavar="N",
        help="data-parallel training on N processes (torchrun + gloo on CPU, accelerate on GPUs); "
        "default: the config's `distributed` section, else one process",
    )  # fmt: skip
    train.add_argument(
        "--machine-rank", type=int, default=0, help="this machine's rank in a multi-machine job (default: 0)"
    )
    train.add_argument(
        "--nnodes", type=int, default=None, metavar="N",
        help="machines in the job (default: the config's `distributed` section, else 1); each runs this "
        "command with --num-processes per machine and the same --main-process-ip/--main-process-port",
    )  # fmt: skip
    train.add_argument("--main-process-ip", default=None, help="rendezvous address of a multi-machine job")
    train.add_argument("--main-process-port", type=int, default=None, help="rendezvous port (default: 29500)")
    train.add_argument(
        "--max-restarts", type=int, default=0, metavar="N",
        help="restart the process group up to N times when a process dies; it resumes from the last "
        "complete checkpoint (default: 0)",
    )  # fmt: skip
    _trust_arguments(train, weights=False)

    explain = commands.add_parser(
        "explain", help="show the resolved plan of a config without loading weights"
    )
    explain.add_argument("config", help="a .yaml / .json pipeline config or a run directory")
    explain.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value (repeatable)",
    )  # fmt: skip
    _trust_arguments(explain, weights=False)

    _run_commands(commands)

    _report_commands(commands)

    quick = commands.add_parser(
        "quickstart",
        help="fine-tune the embedded SmolLM2-135M on the bundled ticket data and show before/after",
    )
    quick.add_argument("--output", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    quick.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    quick.add_argument(
        "--eval-rows", type=int, default=None, help="evaluate on the first N held-out rows only"
    )
    return parser


def _report_commands(commands: Any) -> None:
    """The commands that only read run directories: runs, report."""
    from lorakit.tracking.runs import COLUMNS  # light: JSON reading only

    runs = commands.add_parser("runs", help="a table of the runs under a directory, to compare experiments")
    runs.add_argument("dir", nargs="?", default="runs", help="the directory holding runs (default: runs)")
    runs.add_argument("--sort", default="date", choices=COLUMNS, help="sort by this column (default: date)")
    runs.add_argument("--reverse", action="store_true", help="largest first")

    report = commands.add_parser("report", help="rebuild a run's report.html (and open it with --open)")
    report.add_argument("run", help="a run directory")
    report.add_argument("--open", action="store_true", help="open the report in the web browser")


def _run_commands(commands: Any) -> None:
    """The commands that load a run: eval, generate, chat, merge."""
    evaluate = commands.add_parser("eval", help="loss, perplexity and exact match of a run on labelled data")
    evaluate.add_argument("run", help="a run directory, PEFT adapter directory or saved model")
    evaluate.add_argument("data", help="a data file with reference replies (.jsonl, .json, .csv, ...)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    evaluate.add_argument("--batch-size", type=int, default=8, help="rows per batch (default: 8)")
    evaluate.add_argument("--max-new-tokens", type=int, default=64, help="reply budget for exact match")
    evaluate.add_argument(
        "--json", default=None, help="also write the results (and predictions) to this file"
    )
    evaluate.add_argument("--base", default=None, help="put the adapter on this base model")
    _trust_arguments(evaluate, weights=True)

    generate = commands.add_parser("generate", help="stream the reply to one prompt")
    generate.add_argument("run", help="a run directory, PEFT adapter directory or saved model")
    generate.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    _sampling_arguments(generate)
    _trust_arguments(generate, weights=True)

    chat = commands.add_parser("chat", help="chat with a run in the terminal (/reset clears, /exit quits)")
    chat.add_argument("run", help="a run directory, PEFT adapter directory or saved model")
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")
    _sampling_arguments(chat)
    _trust_arguments(chat, weights=True)

    _serve_commands(commands)

    merge = commands.add_parser("merge", help="merge the adapter into the base and save a plain model")
    merge.add_argument("run", help="a run directory or PEFT adapter directory")
    merge.add_argument("output", help="directory for the merged model")
    merge.add_argument("--no-verify", action="store_true", help="skip the merged vs adapter comparison")
    merge.add_argument("--max-shard-size", default=None, help="largest safetensors shard, e.g. 2GB or 500MB")
    merge.add_argument("--base", default=None, help="merge into this base model instead of the run's")
    _trust_arguments(merge, weights=True)


def _serve_commands(commands: Any) -> None:
    """The commands that ship a run to other services: serve, export."""
    serve = commands.add_parser(
        "serve", help="serve runs behind an OpenAI-compatible HTTP API (one base, an adapter per model id)"
    )
    serve.add_argument("run", help="a run directory (model id: its directory name) or NAME=RUN")
    serve.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=RUN",
        help="another run's adapter on the same base, served as model NAME (repeatable)",
    )  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument(
        "--api-key", default=None,
        help="require 'Authorization: Bearer KEY' (default: $LORAKIT_API_KEY, else no key)",
    )  # fmt: skip
    serve.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens (default: 1024)")
    serve.add_argument("--max-batch", type=int, default=16, help="most requests per batch (default: 16)")
    serve.add_argument(
        "--batch-window", type=float, default=0.02, metavar="SECONDS",
        help="how long the batcher waits after each request for another to join its batch (default: 0.02)",
    )  # fmt: skip
    serve.add_argument(
        "--scheduler", choices=["auto", "continuous", "static"], default="auto",
        help="continuous: requests join and leave the running batch between decode steps; static: one "
        "generate call per batch; auto (default): continuous unless an adapter is prompt-based",
    )  # fmt: skip
    _trust_arguments(serve, weights=True)

    export = commands.add_parser("export", help="export the merged model as a GGUF file (+ Ollama Modelfile)")
    export.add_argument("run", help="a run directory, PEFT adapter directory or saved model")
    export.add_argument("output", help="the .gguf file to write")
    export.add_argument(
        "--dtype", choices=["f32", "f16", "q8_0"], default="f16", help="weights (default: f16)"
    )
    _trust_arguments(export, weights=True)


def _named_runs(args: argparse.Namespace) -> dict[str, str]:
    """``RUN`` / ``NAME=RUN`` and every ``--adapter NAME=RUN`` -> {model id: run directory}."""
    first = args.run.partition("=") if "=" in args.run else ("", "", args.run)
    runs = {first[0] or Path(first[2]).name: first[2]}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {item!r} must look like NAME=RUN, e.g. --adapter legal=runs/legal.")
        if name in runs:
            raise ConfigError(f"--adapter {item!r}: the model id {name!r} is taken; pick another NAME.")
        runs[name] = path
    return runs


def _cmd_serve(args: argparse.Namespace) -> None:
    import os

    from lorakit.serve import Limits, create_app, run_server

    app = create_app(
        _named_runs(args),
        api_key=args.api_key or os.environ.get("LORAKIT_API_KEY") or None,
        limits=Limits(
            max_tokens_cap=args.max_tokens_cap,
            max_batch=args.max_batch,
            batch_window=args.batch_window,
            scheduler=args.scheduler,
        ),
        trust_remote_code=args.trust_remote_code,
        trust_template_classes=args.trust_template_classes,
        allow_pickle=args.allow_pickle,
    )
    run_server(app, host=args.host, port=args.port)


def _cmd_export(args: argparse.Namespace) -> None:
    args.base = None
    model = _load(args)
    out = model.export_gguf(args.output, dtype=args.dtype)
    print(f"lorakit: GGUF written to {out} (Ollama Modelfile beside it)")


def _pipeline(args: argparse.Namespace) -> Any:
    """The pipeline of ``args.config`` with the ``--set`` overrides and the trust opt-ins."""
    from lorakit.configfile import apply_overrides, read_config_file
    from lorakit.pipeline import Pipeline

    return Pipeline.from_config(
        apply_overrides(read_config_file(args.config), args.overrides),
        trust_remote_code=args.trust_remote_code,
        trust_template_classes=args.trust_template_classes,
    )


def _load(args: argparse.Namespace) -> Any:
    """The InferenceModel of ``args.run`` (``--base``, and the trust opt-ins)."""
    from lorakit.inference import InferenceModel

    return InferenceModel.load(
        args.run,
        base=args.base,
        trust_remote_code=args.trust_remote_code,
        trust_template_classes=args.trust_template_classes,
        allow_pickle=args.allow_pickle,
    )


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options, validated before any model loads (a typo fails in a second, not after loading)."""
    from lorakit.generation import Sampling

    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }
    Sampling(**options)
    return options


def _print_stream(chunks: Any) -> str:
    text = []
    for chunk in chunks:
        text.append(chunk)
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text)


def _cmd_train(args: argparse.Namespace) -> None:
    import os

    from lorakit.errors import ConfigError, TrainingError

    pipeline = _pipeline(args)
    output = args.output or str(Path("runs") / Path(args.config).stem)
    processes = args.num_processes
    if processes is None and pipeline.distribution is not None and "WORLD_SIZE" not in os.environ:
        processes = pipeline.distribution.num_processes
    if processes is not None and processes < 1:
        raise ConfigError(f"--num-processes must be a positive number of processes, got {processes}.")
    multi_options = _multi_machine_options(args)
    multi = bool(args.nnodes and args.nnodes > 1) or args.max_restarts > 0
    if processes is None and multi:
        processes = 1
    if processes is not None and (
        processes > 1 or args.machine_rank or pipeline.distribution is not None or multi
    ):
        from lorakit.distributed import launch

        print(pipeline.explain(), flush=True)
        code = launch(
            pipeline,
            output,
            num_processes=processes,
            machine_rank=args.machine_rank,
            overwrite=args.overwrite,
            trust_remote_code=args.trust_remote_code,
            trust_template_classes=args.trust_template_classes,
            **multi_options,
        )
        if code != 0:
            raise TrainingError(
                f"The {processes}-process training run exited with code {code}; its output is above."
            )
        if args.machine_rank:  # the run directory is written by machine rank 0
            print(f"lorakit: machine {args.machine_rank} finished its part of the run")
            return
        from lorakit.rundir import RunDir

        metrics = ", ".join(f"{key} {value:.4g}" for key, value in RunDir(output).read_metrics().items())
        print(f"lorakit: trained {output} on {processes * (args.nnodes or 1)} processes ({metrics})")
        return
    pipeline.train(output, overwrite=args.overwrite)  # the console prints the plan, progress and summary


def _multi_machine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The launch() keywords of --nnodes / --main-process-ip / --main-process-port / --max-restarts (given only)."""
    from lorakit.errors import ConfigError

    if args.nnodes is not None and args.nnodes < 1:
        raise ConfigError(f"--nnodes must be a positive number of machines, got {args.nnodes}.")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be 0 or more, got {args.max_restarts}.")
    options = {
        "num_machines": args.nnodes,
        "main_process_ip": args.main_process_ip,
        "main_process_port": args.main_process_port,
        "max_restarts": args.max_restarts,
    }
    return {key: value for key, value in options.items() if value}


def _cmd_explain(args: argparse.Namespace) -> None:
    print(_pipeline(args).explain())


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    from lorakit.data.load import load_rows
    from lorakit.errors import ConfigError
    from lorakit.evaluation import evaluate_rows

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be a positive number of rows, got {args.limit}.")
    rows, label = load_rows(args.data)
    rows = rows[: args.limit] if args.limit else rows
    model = _load(args)
    results = evaluate_rows(model, rows, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    print(
        f"{label}: {results['rows']} rows, loss {results['loss']:.4f}, perplexity {results['perplexity']:.3f}, "
        f"exact match {100 * results['exact_match']:.1f}%"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _cmd_generate(args: argparse.Namespace) -> None:
    options = _sampling(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = _load(args)
    _print_stream(model.stream(prompt, **options))


def _cmd_chat(args: argparse.Namespace) -> None:
    options = _sampling(args)
    model = _load(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print("lorakit chat: type a message; /reset starts over, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        if interactive:
            print("assistant> ", end="", file=sys.stderr, flush=True)
        reply = _print_stream(model.chat(history, stream=True, **options))
        history.append({"role": "assistant", "content": reply})


def _cmd_merge(args: argparse.Namespace) -> None:
    model = _load(args)
    merged = model.merge(verify=not args.no_verify, inplace=True)
    if merged.merge_report is not None:
        print(merged.merge_report.summary())
    out = merged.save(args.output, max_shard_size=args.max_shard_size)
    print(f"lorakit: merged model saved to {out} (plain transformers; the chat template is the training one)")


def _cmd_runs(args: argparse.Namespace) -> None:
    from lorakit.tracking.runs import find_runs, render_runs, run_row, sorted_rows

    root = Path(args.dir).expanduser()
    rows = [run_row(run, root) for run in find_runs(root)]
    if not rows:
        print(f"lorakit: no runs under {root}")
        return
    print(render_runs(sorted_rows(rows, args.sort, reverse=args.reverse)))


def _cmd_report(args: argparse.Namespace) -> None:
    from lorakit.errors import ConfigError
    from lorakit.rundir import RUN_FILE, RunDir
    from lorakit.tracking.html import write_report_html

    if not RunDir(Path(args.run)).is_run():
        raise ConfigError(f"{args.run} holds no {RUN_FILE}; pass a lorakit run directory.")
    path = write_report_html(args.run)
    print(f"lorakit: report written to {path}")
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from lorakit.quickstart import run_quickstart

    run_quickstart(args.output, max_steps=args.steps, eval_rows=args.eval_rows)


COMMANDS = {
    "train": _cmd_train,
    "explain": _cmd_explain,
    "eval": _cmd_eval,
    "generate": _cmd_generate,
    "chat": _cmd_chat,
    "merge": _cmd_merge,
    "serve": _cmd_serve,
    "export": _cmd_export,
    "quickstart": _cmd_quickstart,
    "runs": _cmd_runs,
    "report": _cmd_report,
}
_LIGHT_COMMANDS = ("runs", "report")  # they read JSON only: no model library is imported


def _run(args: argparse.Namespace) -> None:
    """One command; the commands that load models run with lorakit's handled third-party notices silenced
    (:mod:`lorakit.noise`; ``--help``, ``runs`` and ``report`` import no model library)."""
    if args.command in _LIGHT_COMMANDS:
        COMMANDS[args.command](args)
        return
    from lorakit.noise import quiet
    from lorakit.progress import progress_enabled

    with quiet(progress_bars=progress_enabled()):
        COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code is 0, 2 for a lorakit error, 130 when interrupted, 1 for anything else.

    Every error is reported as one line on stderr (its type and message for an unexpected one); ``--debug``
    re-raises it instead, with the traceback.
    """
    args = _parser().parse_args(argv)
    try:
        _run(args)
        return 0
    except LorakitError as error:
        if args.debug:
            raise
        print(f"lorakit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug or an environment problem: reported, exit code 1 (never swallowed)
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(
            f"lorakit: error: {type(error).__name__}: {message} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
