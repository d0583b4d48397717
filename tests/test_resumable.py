"""ResumableDataLoader: batches depend only on (seed, epoch, position), so a loader restored mid-epoch serves
exactly the rest of the uninterrupted epoch."""

import pytest
import torch

from medseg.data.datamodule import MSDDataModule


@pytest.fixture(scope="module")
def datamodule(tiny_dataset, tmp_path_factory):
    """6 distinct training cases, random patches, flips, affine and intensity augmentation all on."""
    dm = MSDDataModule(str(tiny_dataset), patch_size=(32, 32, 32), batch_size=2, num_samples=1, seed=7,
                       affine_prob=0.5, intensity_prob=0.5, cache="memory", num_workers=0)  # fmt: skip
    dm.setup("fit")
    return dm


def _epoch(loader, epoch: int) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch)
    return [batch["image"] for batch in loader]


def test_batches_depend_only_on_seed_epoch_and_position(datamodule):
    loader = datamodule.train_dataloader()
    first = _epoch(loader, 3)
    _epoch(loader, 4)  # whatever ran in between (other epochs, other random draws) does not matter
    torch.manual_seed(123)
    again = _epoch(datamodule.train_dataloader(), 3)
    assert len(first) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = _epoch(loader, 4)
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_loader_serves_the_rest_of_the_epoch(datamodule, num_workers, monkeypatch):
    monkeypatch.setattr(datamodule, "num_workers", num_workers)  # worker processes fetch ahead of the loop
    uninterrupted = _epoch(datamodule.train_dataloader(), 2)
    served = datamodule.train_dataloader()
    served.sampler.set_epoch(2)
    batches = iter(served)
    next(batches)
    state = served.state_dict()
    assert state == {"epoch": 2, "batches": 1}

    resumed = datamodule.train_dataloader()
    resumed.load_state_dict(state)
    rest = [batch["image"] for batch in resumed]
    assert all(torch.equal(a, b) for a, b in zip(rest, uninterrupted[1:], strict=True))
    assert resumed.state_dict() == {"epoch": 3, "batches": 0}  # a finished epoch resumes at the next one
    # What Lightning does with a plain loader (the epoch's data from its first batch) would be other batches.
    restarted = _epoch(datamodule.train_dataloader(), 2)[: len(rest)]
    assert not any(torch.equal(a, b) for a, b in zip(rest, restarted, strict=True))
