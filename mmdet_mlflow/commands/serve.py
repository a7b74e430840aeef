"""mmdet-mlflow serve: serve a saved model on this machine until Ctrl-C, under `mlflow models
serve` (the default) or Azure's inference server with our online entry script."""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    p = subparsers.add_parser(
        "serve", help="serve a model on 127.0.0.1 until Ctrl-C (mlflow models serve or azmlinfsrv)",
        description="Runs `mlflow models serve --env-manager local` (POST /invocations, "
                    "dataframe_split) or, with --server azureml, Azure's inference server with our "
                    "online entry script (POST /score, input_data), as an Azure online endpoint "
                    "runs it. Works without an activated venv.")
    p.add_argument("--model", required=True, help="an MLflow model folder or models:/NAME/VERSION")
    p.add_argument("--port", type=int, default=5000, help="default 5000")
    p.add_argument("--server", choices=["mlflow", "azureml"], default="mlflow")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    p.add_argument("--log", help="write the server's output here (default: .mmdet-mlflow-serve.log "
                                 "in the current folder)")
    p.set_defaults(handler=run)


def run(args):
    import tempfile
    import time

    from mmdet_mlflow import servers
    from mmdet_mlflow.interruption import Interruption

    # Ctrl-C and SIGTERM (`kill`, `timeout`, a supervisor) stop the server, which runs in a session
    # of its own: if we simply died it would outlive us, holding the port.
    interruption = Interruption()
    interruption.install()

    log = Path(args.log or ".mmdet-mlflow-serve.log").absolute()
    if args.server == "mlflow":
        cmd = servers.mlflow_serve_command(args.model, args.port, args.workers)
        health, route, cwd, env = f"http://127.0.0.1:{args.port}/ping", "/invocations", None, None
    else:
        model = Path(args.model)
        if not model.is_dir():
            raise FileNotFoundError(f"--server azureml takes a model folder; {model} is not one")
        app = servers.azure_app_folder(Path(tempfile.mkdtemp(prefix="mmdet-mlflow-azure-app-")))
        cmd = servers.azmlinfsrv_command(model.absolute(), args.port)
        health, route, cwd = f"http://127.0.0.1:{args.port}/", "/score", app
        env = servers.azmlinfsrv_env(app, args.workers)
    print(f"starting {args.server} server for {args.model} (log: {log})", flush=True)
    with servers.serve(cmd, health, log, cwd=cwd, env=env) as process:
        print(f"serving on http://127.0.0.1:{args.port}{route}; Ctrl-C stops it", flush=True)
        while process.poll() is None:
            interruption.check()
            time.sleep(0.5)
    raise servers.ServerError(f"the server exited with {process.returncode}; see {log}")
