"""Recipe search for the demo model (not a test; goal: segm mAP@[.5:.95] >= 0.70 on
the synthetic validation set with fine-tuning <= 10 minutes on 2 cores).

Runs a list of fine-tune settings one after another, each exactly as `make demo` runs its steps
(the CLI, so the search survives moves inside the package):

    mmdet-mlflow synth --output WORK/data-N-SEED --num-images N --seed SEED         (once per N, SEED)
    mmdet-mlflow finetune --config rtmdet-ins_tiny_8xb32-300e_coco --checkpoint none --recipe quick-cpu
        --training-data .../train.jsonl --validation-data .../validation --output WORK/runs/...  OPTIONS
    mmdet-mlflow evaluate --model .../mlflow_model_folder --test .../validation.coco.json

and reports each one's fine-tune and evaluate wall times, the CPU time of the fine-tune process
(less sensitive to other load on a shared machine), and the validation metrics evaluate writes
(segm mAP@[.5:.95] is the number `make demo` prints). After each setting the table so far is
printed and one JSON line is appended to the results file (outside the repository), with the
CPU model, the core count, the load average and the commit, so runs on different machines or
days can be told apart. Run it on a quiet machine: every other process slows the steps.

A setting is a JSON object: "name", optionally "num_images" (default 300, the demo's), "seed"
(0), "synth" (options of `mmdet-mlflow synth` in snake case: the set's difficulty, e.g.
`{"object_size": [100, 250], "min_visible_fraction": 0.6}`) and "recipe" ("quick-cpu"; null for
none), and any fine-tune option in snake case (`{"image_size": 320, "max_steps": 500}` ->
`--image-size 320 --max-steps 500`), which overrides the recipe's value.

    .venv/bin/python bench/recipe_search.py --settings first-grid
    .venv/bin/python bench/recipe_search.py --settings '[{"name": "lr 8e-3", "learning_rate": 0.008}]'
    .venv/bin/python bench/recipe_search.py --settings my-grid.json --results ~/recipe-search.jsonl
    .venv/bin/python bench/recipe_search.py --settings first-grid --list       # print, run nothing
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _quiet import quiet_logs

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "rtmdet-ins_tiny_8xb32-300e_coco"
DEFAULT_RESULTS = Path.home() / "mmdet-mlflow-recipe-search.jsonl"

# The demo set's difficulty the second grid settled on: larger objects, less occlusion.
EASY = {"object_size": [110, 260], "min_visible_fraction": 0.6}

# Named lists. "first-grid" starts from the demo's recipe and its first feasibility run (the
# tiny model from scratch, 320 px, batch 8, 500 steps: 0.73 on a simpler 4-class shapes set in
# about 9 minutes) and varies one thing at a time around it.
NAMED_SETTINGS = {
    "smoke": [  # seconds: checks that the script and the CLI still fit together
        {"name": "smoke", "num_images": 12, "max_steps": 2, "image_size": 128, "training_batch_size": 2,
         "validation_batch_size": 2, "warmup_steps": 1},
    ],
    "first-grid": [
        {"name": "demo recipe (quick-cpu)"},
        {"name": "320px 500 steps", "image_size": 320, "max_steps": 500},
        {"name": "320px 500 steps lr 8e-3", "image_size": 320, "max_steps": 500, "learning_rate": 0.008},
        {"name": "320px 500 steps lr 2e-3", "image_size": 320, "max_steps": 500, "learning_rate": 0.002},
        {"name": "256px 600 steps", "image_size": 256, "max_steps": 600},
        {"name": "320px 500 steps strong aug", "image_size": 320, "max_steps": 500, "strong_augmentation": True},
        {"name": "320px 500 steps 500 images", "num_images": 500, "image_size": 320, "max_steps": 500},
        {"name": "320px 400 steps batch 12", "image_size": 320, "max_steps": 400, "training_batch_size": 12},
    ],
    # What bench/results/recipe-search.md reports (2026-11-26): the set's difficulty, the budget
    # in steps, the learning rate, the batch size, the input size, validation frequency and a
    # data-loading process, each varied around the demo recipe.
    "second-grid": [
        {"name": "demo recipe (quick-cpu)", "synth": {"object_size": [60, 250], "min_visible_fraction": 0.35},
         "recipe": "quick-cpu", "number_of_epochs": 12, "evaluation_frequency": 1},
        {"name": "easy data, demo recipe, val/6", "synth": EASY, "evaluation_frequency": 6},
        {"name": "easy, 320x256, 300 steps", "synth": EASY, "image_max_size": 320, "image_min_size": 256,
         "max_steps": 300, "evaluation_frequency": 100},
        {"name": "easy, 256, 360 st, lr 8e-3, val/6", "synth": EASY, "learning_rate": 0.008,
         "evaluation_frequency": 6},
        {"name": "easy, 256, batch 4, 600 st, val/last", "synth": EASY, "training_batch_size": 4,
         "max_steps": 600, "evaluation_frequency": 100},
        {"name": "easier (140-280, 0.7), 256, 360 st, val/6", "synth": {"object_size": [140, 280],
         "min_visible_fraction": 0.7}, "evaluation_frequency": 6},
        {"name": "easy, 360 st, val/last, 1 loader", "synth": EASY, "evaluation_frequency": 12, "num_workers": 1},
        {"name": "easy, 300 st, val/last", "synth": EASY, "max_steps": 300, "evaluation_frequency": 10},
        {"name": "easy, 480 st (16 ep), val/8", "synth": EASY, "number_of_epochs": 16, "evaluation_frequency": 8},
    ],
}
SETTING_KEYS = ("name", "num_images", "seed", "recipe", "synth")


def load_settings(text: str) -> list[dict]:
    if text in NAMED_SETTINGS:
        settings = NAMED_SETTINGS[text]
    elif Path(text).is_file():
        settings = json.loads(Path(text).read_text())
    else:
        try:
            settings = json.loads(text)
        except json.JSONDecodeError:
            raise SystemExit(f"--settings: not a named list ({', '.join(NAMED_SETTINGS)}), "
                             f"a JSON file or JSON: {text[:80]}")
    settings = [settings] if isinstance(settings, dict) else settings
    for index, setting in enumerate(settings):
        setting.setdefault("name", f"setting {index + 1}")
    return settings


def cli_options(options: dict) -> list[str]:
    """`{"image_size": 320, "strong_augmentation": true, "object_size": [100, 250]}` ->
    `--image-size 320 --strong-augmentation true --object-size 100 250`."""
    args = []
    for key, value in options.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        args += [f"--{key.replace('_', '-')}",
                 *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return args


def finetune_options(setting: dict) -> list[str]:
    recipe = setting.get("recipe", "quick-cpu")
    return (["--recipe", recipe] if recipe else []) + cli_options(
        {key: value for key, value in setting.items() if key not in SETTING_KEYS})


def cpu_model() -> str:
    """lscpu's model name, with family, model and the widest vector unit: virtual machines often
    report only "AMD EPYC", which does not tell a Zen 2 from a Zen 4."""
    try:
        fields = dict(line.split(":", 1) for line in
                      subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if ":" in line)
    except OSError:
        return platform.processor() or "unknown"
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("Flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{fields.get('Model name', 'unknown')} (family {fields.get('CPU family', '?')}, "
            f"model {fields.get('Model', '?')}, {vector})")


def git_commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True).stdout
    return done.stdout.strip() + ("+changes" if dirty.strip() else "")


def cli(args: list[str], env: dict, log: Path) -> tuple[int, float, float]:
    """Run `mmdet-mlflow ARGS`; its exit code, wall seconds and CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with open(log, "a") as out:
        out.write(f"\n$ mmdet-mlflow {' '.join(args)}\n")
        out.flush()
        code = subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", *args], cwd=ROOT, env=env,
                              stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return code, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_setting(setting: dict, work: Path, env: dict) -> dict:
    num_images, seed = int(setting.get("num_images", 300)), int(setting.get("seed", 0))
    synth_options = cli_options(setting.get("synth") or {})
    data = work / "-".join(["data", str(num_images), str(seed), *(o.lstrip("-") for o in synth_options)])
    slug = "".join(c if c.isalnum() else "-" for c in setting["name"]).strip("-")
    output = work / "runs" / f"{datetime.now():%Y%m%d-%H%M%S}-{slug}"
    output.mkdir(parents=True)
    log = output / "log.txt"
    record = {"setting": setting, "output": str(output), "log": str(log)}
    if not (data / "validation.coco.json").is_file():
        code, _, _ = cli(["synth", "--output", str(data), "--num-images", str(num_images), "--seed", str(seed),
                          *synth_options], env, log)
        if code:
            return {**record, "error": f"synth exited {code}"}
    options = finetune_options(setting)
    record["finetune_options"] = options
    code, record["finetune_seconds"], record["finetune_cpu_seconds"] = cli(
        ["finetune", "--config", CONFIG, "--checkpoint", "none", "--training-data", str(data / "train.jsonl"),
         "--validation-data", str(data / "validation"), "--output", str(output / "finetune"), *options], env, log)
    if code:
        return {**record, "error": f"finetune exited {code}"}
    model = output / "finetune" / "mlflow_model_folder"
    code, record["evaluate_seconds"], _ = cli(
        ["evaluate", "--model", str(model), "--test", str(data / "validation.coco.json"),
         "--output", str(output / "evaluation")], env, log)
    if code:
        return {**record, "error": f"evaluate exited {code}"}
    metrics = json.loads((output / "evaluation" / "metrics.json").read_text())
    record["metrics"] = {"segm_mAP": metrics["segm"]["AP"], "segm_AP50": metrics["segm"]["AP50"],
                         "bbox_mAP": metrics["bbox"]["AP"], "precision": metrics.get("precision"),
                         "recall": metrics.get("recall")}
    finetune_metrics = output / "finetune" / "metrics.json"
    if finetune_metrics.is_file():  # the fine-tune's own record of its epochs (names may change)
        epochs = json.loads(finetune_metrics.read_text()).get("epochs") or []
        record["epochs"] = len(epochs)
    return record


def table(records: list[dict]) -> str:
    rows = [f"{'setting':34} {'images':>6} {'fine-tune s':>11} {'cpu s':>7} {'eval s':>6} "
            f"{'segm mAP':>8} {'AP50':>6} {'prec':>5} {'recall':>6}"]
    for r in records:
        m = r.get("metrics") or {}
        number = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
        rows.append(f"{r['setting']['name'][:34]:34} {r['setting'].get('num_images', 300):>6} "
                    f"{number(r.get('finetune_seconds'), '11.0f')} {number(r.get('finetune_cpu_seconds'), '7.0f')} "
                    f"{number(r.get('evaluate_seconds'), '6.0f')} {number(m.get('segm_mAP'), '8.3f')} "
                    f"{number(m.get('segm_AP50'), '6.3f')} {number(m.get('precision'), '5.2f')} "
                    f"{number(m.get('recall'), '6.2f')}" + (f"  {r['error']} ({r['log']})" if r.get("error") else ""))
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="first-grid",
                        help=f"a named list ({', '.join(NAMED_SETTINGS)}), a JSON file, or JSON")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help=f"append one JSON line per setting here (default {DEFAULT_RESULTS})")
    parser.add_argument("--work", type=Path, help="data and runs (default: a new folder in the temp dir)")
    parser.add_argument("--list", action="store_true", help="print the settings' fine-tune options, run nothing")
    args = parser.parse_args()
    quiet_logs()
    settings = load_settings(args.settings)
    if args.list:
        for setting in settings:
            print(f"{setting['name']}: {setting.get('num_images', 300)} images "
                  f"{' '.join(cli_options(setting.get('synth') or {}))}, {' '.join(finetune_options(setting))}")
        return 0
    for path in (args.results, args.work):
        if path and path.absolute().is_relative_to(ROOT):
            raise SystemExit(f"{path} is inside the repository; results and runs go outside it")
    work = args.work or Path(tempfile.mkdtemp(prefix="recipe-search-"))
    work.mkdir(parents=True, exist_ok=True)
    # The fine-tunes track into the search's own MLflow store, as the demo's track into its own.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "commit": git_commit()}
    print(f"CPU: {machine['cpu']}, {machine['cores']} cores; commit {machine['commit']}; "
          f"{len(settings)} settings; work: {work}; results: {args.results}", flush=True)
    records = []
    for setting in settings:
        load = os.getloadavg()[0]
        print(f"\n== {setting['name']} (load average {load:.1f})", flush=True)
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **machine,
                  "load_average_before": round(load, 2), **run_setting(setting, work, env)}
        records.append(record)
        with open(args.results, "a") as out:
            out.write(json.dumps(record) + "\n")
        print(table(records), flush=True)
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
