"""A training loader that resumes mid-epoch exactly: same remaining batches, same patches, same augmentation.

Lightning 2.6 saves the state of any train loader with `state_dict()`/`load_state_dict()` in the checkpoint
(`loops.fit_loop.state_dict.combined_loader`) and loads it before the resumed epoch's iterator is made; it restores
nothing else about the data, so a plain DataLoader restarts an interrupted epoch from its first batch, with a fresh
shuffle. torchdata's StatefulDataLoader would restore the sampler position, but not the random state of MONAI's
transforms inside each worker process. Here nothing random is carried from step to step instead: the shuffle order
is drawn from (seed, epoch) (torch's DistributedSampler, which is also what DDP needs) and each item's random
transforms are seeded from (seed, epoch, index). The whole state is then two numbers, the epoch and the batches
already served, and a result does not depend on the worker count or on where a run was resumed.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np
from monai.data import DataLoader
from monai.transforms import Randomizable
from torch.utils.data import Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """Shuffles with a generator seeded by `seed + epoch` (Lightning calls `set_epoch`) and yields `(epoch, index)`
    pairs, so the dataset can seed each item; `skip` items at the start of the next iteration are left out.

    Being a DistributedSampler, Lightning keeps it under DDP instead of wrapping it, and each rank takes its share.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch, skip, self.skip = self.epoch, self.skip, 0
        for position, index in enumerate(super().__iter__()):
            if position >= skip:
                yield epoch, index


class SeededItems(Dataset):
    """Wraps a MONAI dataset; item `(epoch, index)` is `dataset[index]` with every random transform of
    `dataset.transform` seeded from `(seed, epoch, index)` first, so it is the same in any process, at any time."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        transform = self.dataset.transform
        if isinstance(transform, Randomizable):
            # Compose hands each random transform its own seed drawn from this one.
            item_seed = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
            transform.set_random_state(seed=int(item_seed))
        return self.dataset[index]


class ResumableDataLoader(DataLoader):
    """MONAI's DataLoader (its collate flattens the `num_samples` patches per image) over `SeededItems` with an
    `EpochSampler`, plus the state Lightning saves: the epoch and the batches this process has served of it.

    Args:
        dataset: a MONAI dataset whose `transform` ends with the random steps.
        seed: base of the shuffle and augmentation seeds.
        batch_size, drop_last, num_workers, persistent_workers: as for `torch.utils.data.DataLoader`.
        num_replicas, rank: DDP world size and this process's rank.
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        batch_size: int = 1,
        drop_last: bool = False,
        num_workers: int = 0,
        persistent_workers: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        sampler = EpochSampler(dataset, seed, num_replicas=num_replicas, rank=rank)
        super().__init__(
            SeededItems(dataset, seed),
            sampler=sampler,
            batch_size=batch_size,
            drop_last=drop_last,
            num_workers=num_workers,
            persistent_workers=persistent_workers,
        )
        self.position = (0, 0)  # (epoch, batches of it served so far)

    def __iter__(self) -> Iterator:
        # Counted here, as batches reach the training loop: workers fetch ahead of it.
        epoch, served = self.sampler.epoch, self.sampler.skip // self.batch_size
        self.position = (epoch, served)
        for batch in super().__iter__():
            served += 1
            self.position = (epoch, served)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """`{"epoch": int, "batches": int}`: the epoch in progress and the batches already served of it
        (a finished epoch is saved as the start of the next)."""
        epoch, served = self.position
        if served >= len(self):
            return {"epoch": epoch + 1, "batches": 0}
        return {"epoch": epoch, "batches": served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Called before the resumed epoch's iterator is made (and before set_epoch, which workers may not wait for).
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip = state["batches"] * self.batch_size
