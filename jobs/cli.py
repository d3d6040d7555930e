"""`genfleet`: run, demo, make-tiny, status, errors, report, submit."""

from __future__ import annotations

import argparse
import dataclasses
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
from pipeline.version import __version__

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
    p.add_argument("--takeover", action="store_true", help="take OUTPUT over from a driver that holds its lease but is dead")
    p.add_argument("--retry-errors", action="store_true", help="run the pairs that failed for good again too "
                   "(transient failures always run again)")
    p.add_argument("--cpu", action="store_true", default=None, help="run every stage (and scorer) on CPU, whatever the spec says")
    p.add_argument("--spec-json", help=argparse.SUPPRESS)  # a resolved spec, as `submit` sends it


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def _families() -> str:
    return ", ".join(sorted(installed())) or "none installed"


def _spec(args):
    if args.spec_json:
        return load_spec(None, json.loads(args.spec_json), args.sets)
    return load_spec(args.spec, {"manifest": args.manifest, "output": args.output, "family": args.family, "model": args.model,
                                 "cpu": args.cpu}, args.sets)


def cmd_run(args) -> int:
    from jobs.driver import dry_run, run_job

    if args.dry_run:
        plan = dry_run(_spec(args), new_run=args.new_run, retry_errors=args.retry_errors)
        print(f"genfleet: dry run: every check passed; nothing was started or written\n{format_table(plan)}")
        return 0
    result = run_job(_spec(args), new_run=args.new_run, retry_errors=args.retry_errors, takeover=args.takeover, limit=args.limit)
    print(f"genfleet: job {result['status']}\n{format_table(result)}")
    if "limited_to_rows_before" in result:
        print(f"genfleet: --limit {args.limit}: {result['missing']} (id, sample) pair(s) are left; "
              "the same command without --limit makes them")
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
    if data["state"] == "dead" and not args.json:
        print("genfleet: its driver is gone without ending the run (no heartbeat); run the same command again to resume")
    return 0


def cmd_errors(args) -> int:
    from pipeline.report_data import read_errors

    kinds = read_errors(args.output, args.kind, args.examples)
    if args.json:
        print(json.dumps([dataclasses.asdict(k) for k in kinds], indent=1))
        return 0
    total = sum(k.count for k in kinds)
    what = f"of kind {args.kind} " if args.kind else ""
    print(f"genfleet errors {what}of {redact(args.output)}: {total} permanent error(s)"
          + (f" in {len(kinds)} kind(s)" if len(kinds) > 1 else ""))
    for k in kinds:
        print(f"  {k.kind}: {k.count}")
        for e in k.examples:
            print(f"    {e.id} [{e.sample_index}] {e.stage}: {e.message}")
    if args.kind and not kinds:
        print(f"  (no errors of kind {args.kind}; `genfleet errors {redact(args.output)}` lists the kinds)")
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
    if not args.wait:  # the job runs on: say how to watch it
        print(f"genfleet: follow it with `ray job logs --address {args.address} --follow {job_id}`, "
              f"or `genfleet status {redact(args.output or _spec(args).output)}`")
    return 0


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="debug logging (-vv: third-party libraries' too)")
    p = argparse.ArgumentParser(prog="genfleet", description="Batch generation with multistage image models on Ray.",
                                epilog=f"installed families: {_families()}", parents=[common])
    p.add_argument("--version", action="version", version=f"genfleet {__version__}")
    p.set_defaults(verbose=0)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a job", parents=[common])
    _job_args(run)
    run.add_argument("--dry-run", action="store_true", help="check the spec, model, manifest and output and print the plan; "
                     "start no Ray, load no model, write nothing")
    run.add_argument("--limit", type=_positive, metavar="N", help="run only the first N rows with work left (a smoke run "
                     "into the same OUTPUT; the same command without --limit completes it)")
    run.set_defaults(fn=cmd_run)
    demo = sub.add_parser("demo", help="run a small job with a tiny random-weight model", parents=[common])
    demo.add_argument("--output", default="demo-output")
    demo.add_argument("--family", default=DEMO_DEFAULT, help=f"one of: {_families()} (default {DEMO_DEFAULT})")
    demo.set_defaults(fn=cmd_demo)
    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight model in the family's released layout", parents=[common])
    tiny.add_argument("family", help=f"one of: {_families()}; or clip: a tiny CLIP for scores.clip.model")
    tiny.add_argument("dir")
    tiny.set_defaults(fn=cmd_make_tiny)
    st = sub.add_parser("status", help="progress of a running or finished job", parents=[common])
    st.add_argument("output")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)
    er = sub.add_parser("errors", help="the permanent errors of a job: each kind, its count and example rows", parents=[common])
    er.add_argument("output")
    er.add_argument("--kind", help="only this kind (e.g. empty_prompt)")
    er.add_argument("--examples", type=int, default=5, metavar="N", help="example rows per kind (default 5)")
    er.add_argument("--json", action="store_true")
    er.set_defaults(fn=cmd_errors)
    rp = sub.add_parser("report", help="write an HTML report of a running or finished job", parents=[common])
    rp.add_argument("output")
    rp.add_argument("--out", help="where to write it (any fsspec URL; default OUTPUT/report.html)")
    rp.set_defaults(fn=cmd_report)
    sb = sub.add_parser("submit", help="run the job through Ray Jobs on a cluster", parents=[common])
    _job_args(sb)
    sb.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://head:8265")
    sb.add_argument("--working-dir", default=".", help="directory shipped to the cluster (the genfleet checkout)")
    sb.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    sb.set_defaults(fn=cmd_submit)
    return p


THIRD_PARTY_LOGGERS = ("botocore", "boto3", "s3fs", "aiobotocore", "fsspec", "urllib3", "asyncio", "filelock")


class _Redact(logging.Filter):
    """Every log line passes through the same redaction as messages (botocore's debug lines
    would otherwise print credentials)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        return True


def _setup_logging(verbosity: int) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_Redact())
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbosity else logging.INFO, handlers=[handler], force=True)
    for name in THIRD_PARTY_LOGGERS:  # their debug output only with -vv
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)


def _no_credentials(e: BaseException) -> bool:
    """botocore's NoCredentialsError (s3fs lets it through): it names neither the URL nor a fix."""
    return any(c.__name__ == "NoCredentialsError" for c in type(e).__mro__)


def _s3_urls(args) -> list[str]:
    """The job's s3:// URLs (flags, or the spec they come from), for a message that names them."""
    urls = [getattr(args, k, None) for k in ("output", "manifest", "model")]
    if getattr(args, "spec", None) or getattr(args, "spec_json", None):
        try:
            spec = _spec(args)
            urls += [spec.manifest.path, spec.output, spec.model]
        except Exception:  # noqa: BLE001 - a spec that does not load names no URLs
            pass
    return sorted({u for u in urls if isinstance(u, str) and u.startswith(("s3://", "s3a://"))})


def _raised_in_ray(e: BaseException) -> bool:
    """Ray re-raises a worker's exception as a subclass of it (RayTaskError(ValueError)): what
    failed inside the run is a job failure, whatever its type."""
    return any(c.__name__.startswith(("RayTaskError", "RayActorError")) for c in type(e).__mro__)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except (JobStopped, JobIncomplete) as e:
        print(f"genfleet: job {'stopped' if isinstance(e, JobStopped) else 'incomplete'}: {redact(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("genfleet: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, the trace in -v
        if _no_credentials(e) and not _raised_in_ray(e):
            where = ", ".join(redact(u) for u in _s3_urls(args)) or "S3"
            print(f"genfleet: error: no AWS credentials to reach {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                  "or AWS_PROFILE (a profile in ~/.aws/credentials)", file=sys.stderr)
            return 2
        if isinstance(e, USER_ERRORS) and not _raised_in_ray(e):
            print(f"genfleet: error: {redact(str(e))}", file=sys.stderr)
            return 2
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
