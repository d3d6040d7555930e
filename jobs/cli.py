"""`genfleet`: run, demo, make-tiny, status, report, submit."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from pipeline.families import DEMO_DEFAULT, installed
from pipeline.family import ModelError
from pipeline.manifest import ManifestError
from pipeline.outcome import JobIncomplete, JobStopped
from pipeline.report import format_table, status
from pipeline.resume import ResumeError
from pipeline.spec import SpecError, load_spec
from pipeline.storage import redact

# what the user can fix in the spec, the model path or the manifest before a run: exit 2
USER_ERRORS = (SpecError, ManifestError, ResumeError, ModelError)

log = logging.getLogger("genfleet")


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="job spec YAML (flags override it)")
    p.add_argument("--manifest", help="Parquet manifest: file, directory/prefix or glob (any fsspec URL)")
    p.add_argument("--output", help="output directory/prefix (any fsspec URL)")
    p.add_argument("--family", help=f"model family: {_families()}, or package.module:ATTR")
    p.add_argument("--model", help="model directory or config file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field by dotted path, e.g. stages.lmm.batch_size=8 (repeatable)")
    p.add_argument("--new-run", action="store_true", help="discard what OUTPUT holds and start over")
    p.add_argument("--retry-errors", action="store_true", help="run the pairs that failed for good again too "
                   "(transient failures always run again)")
    p.add_argument("--spec-json", help=argparse.SUPPRESS)  # a resolved spec, as `submit` sends it


def _families() -> str:
    return ", ".join(sorted(installed())) or "none installed"


def _spec(args):
    if args.spec_json:
        return load_spec(None, json.loads(args.spec_json), args.sets)
    return load_spec(args.spec, {"manifest": args.manifest, "output": args.output, "family": args.family, "model": args.model}, args.sets)


def cmd_run(args) -> int:
    from jobs.driver import run_job

    result = run_job(_spec(args), new_run=args.new_run, retry_errors=args.retry_errors)
    print(f"genfleet: job {result['status']}\n{format_table(result)}")
    return 0


def cmd_demo(args) -> int:
    from jobs.demo import run_demo

    return run_demo(args.output, args.family)


def cmd_make_tiny(args) -> int:
    from jobs.demo import make_tiny

    path = make_tiny(args.family, args.dir)
    print(f"genfleet: wrote a tiny random-weight {args.family} model to {path}")
    return 0


def cmd_status(args) -> int:
    data = status(args.output)
    print(json.dumps(data, indent=1) if args.json else f"genfleet status of {redact(args.output)}\n{format_table(data)}")
    return 0


def cmd_report(args) -> int:
    from pipeline.report_html import write_report

    print(f"genfleet: wrote the report of {redact(args.output)} to {redact(write_report(args.output, args.out))}")
    return 0


def cmd_submit(args) -> int:
    from jobs.submit import submit

    job_id = submit(_spec(args), address=args.address, working_dir=args.working_dir, new_run=args.new_run,
                    retry_errors=args.retry_errors, wait=args.wait)
    print(f"genfleet: submitted {job_id}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genfleet", description="Batch generation with multistage image models on Ray.",
                                epilog=f"installed families: {_families()}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a job")
    _job_args(run)
    run.set_defaults(fn=cmd_run)
    demo = sub.add_parser("demo", help="run a small job with a tiny random-weight model")
    demo.add_argument("--output", default="demo-output")
    demo.add_argument("--family", default=DEMO_DEFAULT, help=f"one of: {_families()} (default {DEMO_DEFAULT})")
    demo.set_defaults(fn=cmd_demo)
    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight model in the family's released layout")
    tiny.add_argument("family", help=f"one of: {_families()}")
    tiny.add_argument("dir")
    tiny.set_defaults(fn=cmd_make_tiny)
    st = sub.add_parser("status", help="progress of a running or finished job")
    st.add_argument("output")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)
    rp = sub.add_parser("report", help="write an HTML report of a running or finished job")
    rp.add_argument("output")
    rp.add_argument("--out", help="where to write it (any fsspec URL; default OUTPUT/report.html)")
    rp.set_defaults(fn=cmd_report)
    sb = sub.add_parser("submit", help="run the job through Ray Jobs on a cluster")
    _job_args(sb)
    sb.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://head:8265")
    sb.add_argument("--working-dir", default=".", help="directory shipped to the cluster (the genfleet checkout)")
    sb.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    sb.set_defaults(fn=cmd_submit)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return args.fn(args)
    except USER_ERRORS as e:
        print(f"genfleet: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except (JobStopped, JobIncomplete) as e:
        print(f"genfleet: job {'stopped' if isinstance(e, JobStopped) else 'incomplete'}: {redact(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("genfleet: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, the trace in -v
        log.debug("job failed", exc_info=True)
        print(f"genfleet: job failed: {redact(root_cause(e))}", file=sys.stderr)
        return 1


def root_cause(e: BaseException) -> str:
    """One line: Ray wraps a worker's exception with its remote traceback as text;
    the last `SomeError: message` line of it is what went wrong."""
    causes = [line.strip() for line in str(e).splitlines() if re.match(r"^\s*[\w.]+(Error|Exception|Exit): ", line)]
    return causes[-1] if causes else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


if __name__ == "__main__":
    sys.exit(main())
