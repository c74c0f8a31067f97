"""Command line: ``gemmbridge info``."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from .info import report

    result = report()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print("gemmbridge " + result["versions"]["gemmbridge"])
        print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v and k != "gemmbridge"))
        missing = [k for k, v in result["versions"].items() if v is None]
        if missing:
            print("not installed: " + ", ".join(missing))
        for check in result["checks"]:
            if check.get("ok") is None or "rel_err" not in check:
                print(f"  {check['backend']:5} {'skipped' if check.get('ok') is None else 'FAILED'}: {check['reason']}")
                continue
            status = "ok" if check["ok"] else "FAILED"
            print(
                f"  {check['backend']:5} {check['device']:28} {check['library']:32} "
                f"self-check fp32 matmul+bias+gelu rel err {check['rel_err']:.1e} {status}"
            )
    return 0 if all(c.get("ok") is not False for c in result["checks"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gemmbridge", description="Vendor GEMM for any framework's tensors.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="backends, devices, versions, and a self-check matmul per backend")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
