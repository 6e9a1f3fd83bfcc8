"""What a continual run keeps on disk to be resumed (`--resume`): its config.yaml, and per finished stage
`domains/<k>-<name>/stage/` (its report rows, the served module, the kept module, the combination weights and the
reference's judged samples), written last-file-atomically: `stage.json`, written last, marks a stage complete."""

from __future__ import annotations

import shutil
from pathlib import Path

from peft import LoraConfig
from safetensors.torch import load_file, save_file

from ..config import RESUME_MAY_CHANGE, ContinualConfig, changed_options, read_config_file
from ..distributed import Processes
from ..errors import ConfigError
from ..files import read_json, write_json
from ..modules import write_adapter
from ..rundir import RUN_OUTPUTS, STAGE_FOLDER, STAGE_RECORD

CONTINUAL_MARKERS = ("report.json", "domains")
# everything a continual run writes into its folder (the stages under domains/, `report.write_report`'s files, the
# served adapter and its tokenizer, config.yaml), and what a training run writes (`rundir.RUN_OUTPUTS`): --overwrite
# removes all of it, so nothing of the run before (its report, heatmap, stages) is read as this run's
CONTINUAL_OUTPUTS = tuple(dict.fromkeys(CONTINUAL_MARKERS + ("config.yaml", "report.txt", "heatmap.png")
                                        + RUN_OUTPUTS))


def stage_finished(stage_dir: Path) -> bool:
    """Whether the stage in `stage_dir` (`domains/<k>-<domain>`) finished: `save_stage` writes its record last."""
    return (stage_dir / STAGE_FOLDER / STAGE_RECORD).is_file()


def remove_outputs(paths) -> None:
    """--overwrite: remove each of `paths` there is, or stop with one line naming the one that cannot go."""
    for path in paths:
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        except OSError as err:
            raise ConfigError(f"--overwrite: cannot remove {path} of the previous run ({err.strerror}); remove it "
                              "or choose another --output-dir.") from None


def check_output_dir(config: ContinualConfig, output_dir: Path) -> None:
    """Refuse to write over another run unless --resume or --overwrite says what to do with it."""
    held = [m for m in CONTINUAL_MARKERS if (output_dir / m).exists()]
    if held and not (config.overwrite or config.resume):
        raise ConfigError(f"--output-dir {output_dir} holds another run ({', '.join(held)}); "
                          "pass --resume to continue it or --overwrite to replace it.")


def check_resumable(config: ContinualConfig, output_dir: Path) -> None:
    """--resume continues the run in --output-dir only if it is the same run: same options but for how it runs."""
    saved_path = output_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume: {output_dir} holds no continual run (no config.yaml).")
    saved = read_config_file(saved_path, ContinualConfig)
    changed = changed_options(saved, config.to_dict(), RESUME_MAY_CHANGE)
    if changed:
        raise ConfigError(f"--resume: {saved_path} was written with other options ({', '.join(changed)}); "
                          "resume with the same options, or pass --overwrite to start again.")


def prepare_output(config: ContinualConfig, output_dir: Path, processes: Processes) -> None:
    """The run's folder: with --overwrite (and not --resume) everything another run wrote there removed (without,
    `check_output_dir` refused a folder holding one), this run's config.yaml written."""
    if processes.is_main:  # only the main process writes; the others compute the same combinations
        output_dir.mkdir(parents=True, exist_ok=True)
        if config.overwrite and not config.resume:
            remove_outputs([output_dir / name for name in CONTINUAL_OUTPUTS]
                           + sorted(output_dir.glob(".tmp-checkpoint-*")))
        config.save_yaml(output_dir / "config.yaml")
    processes.barrier()


def save_stage(stage_dir: Path, processes: Processes, record: dict, kept_state, served, served_lora) -> None:
    """What a resumed run needs of the finished stage in `stage_dir`, in its STAGE_FOLDER: `record` (the report's
    row, the rows, the weights, the reference's scores) as STAGE_RECORD, written last, so it marks completeness."""
    folder = stage_dir / STAGE_FOLDER
    if processes.is_main:
        if folder.exists():
            shutil.rmtree(folder)
        write_adapter(served_lora, served, folder / "served")
        if kept_state is not None:
            save_file({n: t.detach().contiguous().cpu() for n, t in kept_state.items()}, folder / "kept.safetensors")
        write_json(folder / STAGE_RECORD, record)
    processes.barrier()


def load_stage(stage_dir: Path):
    """(record, kept, served, served LoraConfig) of the finished stage saved in `stage_dir`, or None."""
    if not stage_finished(stage_dir):
        return None
    folder = stage_dir / STAGE_FOLDER
    record = read_json(folder / STAGE_RECORD, f"remove {folder} to train that stage again.")
    served_lora = LoraConfig.from_pretrained(str(folder / "served"))
    served_lora.inference_mode = False
    served = load_file(folder / "served" / "adapter_model.safetensors")
    kept = load_file(folder / "kept.safetensors") if (folder / "kept.safetensors").is_file() else None
    return record, kept, served, served_lora
