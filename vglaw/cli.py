"""`vglaw`: a dispatcher. It imports only the command asked for (Lightning's fit / validate /
test in `vglaw.training.lightning`, the others in `vglaw.commands`), so `vglaw --help` and a
command's `--help` answer without loading torch."""
from __future__ import annotations

import errno
import os
import sys

USAGE = """usage: vglaw <command> [options]

  fit | validate | test   Lightning CLI: --config configs/<dataset>.yaml, --print_config, overrides
  predict                 ground expressions: --image x.jpg --text "left dog" [--model DIR|HUB_ID|CKPT],
                          or many pairs: --pairs pairs.jsonl; --explain draws which words drive which block
  describe                an expression for each --box of an --image, checked by grounding it back;
                          or a describing model evaluated on a split (--dataset)
  export                  a training checkpoint -> a model folder (--onnx: an ONNX file)
  ablate                  what the language-adaptive weights do: a split evaluated with the language removed
  data shapes             generate the synthetic shapes dataset in the refer format
  data check              check a prepared refer-format folder and print per-split counts
  serve                   a web page to ground expressions in uploaded images (Gradio)
  bench                   parameters, FLOPs, latency, throughput and memory (writes bench/results.json)

Run `vglaw <command> --help` for the options of each. A mistake in what you give (a file, a field,
a value) is reported in one line per problem, with exit code 2."""


# Failures of the place a command works in (a full disk, a quota, a read-only mount, a folder
# that vanished under it), found at the end of the work: one line, not a traceback.
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOENT)


# command -> the module whose `main(argv)` runs it
COMMANDS = {
    "fit": "vglaw.training.lightning",
    "validate": "vglaw.training.lightning",
    "test": "vglaw.training.lightning",
    "predict": "vglaw.commands.predict",
    "data": "vglaw.commands.data",
    "bench": "vglaw.commands.bench",
    "export": "vglaw.commands.export",
    "describe": "vglaw.commands.describe",
    "ablate": "vglaw.commands.ablate",
    "serve": "vglaw.commands.serve",
}
LIGHTNING = ("fit", "validate", "test")  # LightningCLI reads the subcommand itself


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    from vglaw.errors import UserError

    try:
        if command in COMMANDS:
            import importlib

            module = importlib.import_module(COMMANDS[command])
            return module.main(argv if command in LIGHTNING else rest)
    except UserError as err:
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"vglaw {command}: error: {line}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in OUTPUT_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"vglaw {command}: error: {where}{err.strerror or err} (outputs are written whole or not at all: no "
              "file was left half-written)", file=sys.stderr)
        return 2
    print(f"vglaw: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
