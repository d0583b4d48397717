"""An nnU-Net model folder of a plan's `3d_fullres` network with random weights, for predict_speed.py: run with the
peer venv's python (imports nnunetv2), $nnUNet_results set.

    <work>/venv/bin/python benchmarks/peers/nnunet_model.py <preprocessed dataset folder>

Writes `$nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__3d_fullres/` as `nnUNetv2_train` leaves it for
`nnUNetv2_predict`: `plans.json`, `dataset.json` and `fold_0/checkpoint_final.pth` (nnU-Net's own
`save_checkpoint`). Prediction time and memory do not depend on the weights. Prints the folder.
"""

import argparse
import json
import shutil
from pathlib import Path

from nnunet_step import planned_trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("preprocessed", type=Path, help="nnUNet_preprocessed/DatasetXXX_Name")
    args = p.parse_args()
    trainer, dataset_json = planned_trainer(args.preprocessed)
    # sets the mirroring axes the checkpoint carries (training sets them when it builds its loaders; without them
    # nnUNetv2_predict would not mirror)
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    folder = Path(trainer.output_folder_base)
    Path(trainer.output_folder).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.preprocessed / "nnUNetPlans.json", folder / "plans.json")
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    print(folder)


if __name__ == "__main__":
    main()
