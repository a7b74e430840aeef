"""Load on both servers: ``--requests`` (200) requests at ``--concurrency`` (8), good and bad
mixed, different params per request, against ``mlflow models serve`` and ``azmlinfsrv`` with
our entry script, each on 127.0.0.1 with one worker. Prints p50/p95 latency, connection errors,
5xx, answers that differ from the same request answered alone (cross-talk), and the server's
resident memory after 100 requests and at the end (``--requests 1000``: within 10 %).
With ``--over-budget N`` (default 10) each server gets the same load a second time with N of
its bad requests over the work budget (refused before any pass), and the good requests'
p50/p95 latency of both runs and their ratio are printed, then the CPU the server spends in
the 3 s after the load (about 0: no worker still working).

    PYTHONPATH=. python bench/load.py --model /path/to/mlflow-model [--requests 1000]

Without --model, a tiny RTMDet-Ins with random weights is packaged into a scratch folder
(``--runtime onnx``: as an ONNX Runtime model)."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _quiet import packaging_to_stderr, quiet_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def tiny_model(folder: Path, runtime: str) -> Path:
    import mlflow_model
    from helpers import TINY, make_official_checkpoint

    checkpoint = make_official_checkpoint(folder / "tiny.pth")
    with packaging_to_stderr():
        mlflow_model.save_model(folder / "tiny", TINY, str(checkpoint), runtime=runtime)
    return folder / "tiny"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an MLflow model folder (default: a tiny one)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--servers", default="mlflow-serve,azmlinfsrv")
    parser.add_argument("--over-budget", type=int, default=10,
                        help="over-budget requests in the second run (0: one run only)")
    parser.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                        help="the tiny model's runtime (without --model)")
    args = parser.parse_args()
    quiet_logs()

    from load_harness import Server, busy_seconds_after, run_load
    from mmdet_mlflow import servers

    scratch = Path(tempfile.mkdtemp(prefix="mmdet-mlflow-load-"))
    failed = False
    try:
        model = args.model or tiny_model(scratch, args.runtime)
        for name in args.servers.split(","):
            port = servers.free_port()
            log = scratch / f"{name}.log"
            if name == "mlflow-serve":
                context = servers.serve(servers.mlflow_serve_command(str(model), port),
                                        f"http://127.0.0.1:{port}/ping", log)
                route = "/invocations"
            else:
                app = servers.azure_app_folder(scratch / "app")
                shutil.copytree(model, scratch / "models" / name / "model")
                context = servers.serve(servers.azmlinfsrv_command(scratch / "models" / name, port),
                                        f"http://127.0.0.1:{port}/", log, cwd=app, env=servers.azmlinfsrv_env(app))
                route = "/score"
            with context as process:
                server = Server(name, f"http://127.0.0.1:{port}{route}", process.pid)
                checkpoints = tuple(n for n in (100,) if n < args.requests)
                outcome = run_load(server, args.requests, args.concurrency, rss_at=checkpoints)
                if args.over_budget:
                    mixed = run_load(server, args.requests, args.concurrency, over_budget=args.over_budget)
                    idle = busy_seconds_after(server.pid)
            print(f"{name}: {outcome.summary()}", flush=True)
            if args.over_budget:
                print(f"{name} with {args.over_budget} over-budget requests: {mixed.summary()}")
                print(f"  good requests' latency with / without them: p50 "
                      f"{mixed.percentile(0.5, mixed.good_latencies) / outcome.percentile(0.5, outcome.good_latencies):.2f}x, "
                      f"p95 {mixed.percentile(0.95, mixed.good_latencies) / outcome.percentile(0.95, outcome.good_latencies):.2f}x; "
                      f"CPU in the 3 s after: {idle:.2f} s", flush=True)
                failed |= bool(mixed.connection_errors or mixed.server_errors or mixed.wrong_answers
                               or mixed.unexpected)
            for problem in (outcome.connection_errors + outcome.server_errors + outcome.wrong_answers
                            + outcome.unexpected)[:10]:
                print(f"  {problem}")
            failed |= bool(outcome.connection_errors or outcome.server_errors or outcome.wrong_answers
                           or outcome.unexpected)
            if 100 in outcome.rss_after and args.requests >= 1000:
                growth = outcome.rss_after[args.requests] / outcome.rss_after[100] - 1
                print(f"  RSS growth from request 100 to {args.requests}: {growth:+.1%}")
                failed |= growth > 0.10
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
