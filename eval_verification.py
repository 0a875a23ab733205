"""Evaluate models on InsightFace `.bin` verification sets (LFW, CFP-FP, CFP-FF, AgeDB-30, CALFW, CPLFW):
10-fold accuracy with the flip test, +- std per target and the mean. Writes verification.json and .csv.

    python eval_verification.py --rec /data/faces_webface_112x112 --val_targets lfw,cfp_fp,agedb_30 \
        --models r50=/path/backbone.pth --network iresnet50

Every key of config/config.py can be overridden: `--KEY VALUE`; `--help` lists them.
"""
import logging

from utils.artifacts.locking import OutputLock
from utils.artifacts import paths
from utils.artifacts.files import ArtifactError, atomic_write_csv, atomic_write_json
from utils.errors import UserError
from utils.evaluation.commands import add_model_args, out_dir, parse_models
from utils.models.build import dataset_image_size, load_backbone
from utils.runtime.stage import run_stage
from utils.evaluation.verification import VerificationSet, format_table

log = logging.getLogger("diffprob")


def run_verification(cfg, ctx, args) -> dict:
    models = parse_models(cfg, args.models)
    with OutputLock(out_dir(cfg, args, models), what="eval_verification.py"):  # one run per result folder
        return _evaluate(cfg, ctx, args, models)


def _evaluate(cfg, ctx, args, models: dict) -> dict:
    bins = paths.bin_paths(cfg)
    missing = [str(p) for p in bins.values() if not p.exists()]
    if missing:
        raise ArtifactError(f"verification sets not found: {', '.join(missing)} (--val_targets names .bin files in --rec)")
    if not bins:
        raise UserError("no verification targets: give --val_targets lfw,cfp_fp,...")
    size = dataset_image_size(cfg.rec)
    sets = [VerificationSet(name, path, image_size=(size, size)) for name, path in bins.items()]

    results = {}
    for name, path in models.items():
        model = load_backbone(cfg, ctx, path, size)
        res = {vs.name: vs.run(model, batch_size=cfg.eval_batch_size, device=ctx.device, dtype=ctx.amp_dtype,
                               progress=ctx.is_main) for vs in sets}
        results[name] = {"checkpoint": str(path), "targets": res}
        print(f"\n{name} ({path}):\n{format_table(res)}")

    out = out_dir(cfg, args, models)
    if ctx.is_main:
        atomic_write_json(out / "verification.json", results)
        header = ["model"] + [f"{t} acc" for t in bins] + [f"{t} std" for t in bins] + ["mean"]
        rows = []
        for name, r in results.items():
            accs = [r["targets"][t]["accuracy_mean"] for t in bins]
            rows.append([name] + [f"{a:.5f}" for a in accs] + [f"{r['targets'][t]['accuracy_std']:.5f}" for t in bins]
                        + [f"{sum(accs) / len(accs):.5f}"])
        atomic_write_csv(out / "verification.csv", header, rows)
        log.info("wrote %s", out / "verification.json")
    return results


if __name__ == "__main__":
    run_stage("eval_verification", run_verification, description=__doc__, extra_args=add_model_args,
              preset_needed=True)
