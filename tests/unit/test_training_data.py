"""How a training worker gets its rows when its share fits in memory: read straight from the
Parquet split, an equal share per worker, reshuffled every epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.train_loop import ShardInMemory


def _tensors(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.column_stack([batch["a"], batch["b"]]).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(np.array(batch["label"], dtype=np.int64))


@pytest.fixture
def split(tmp_path: Path) -> Path:
    """30 rows in files of 10, 7 and 13 rows; row i has a = i."""
    start = 0
    for index, count in enumerate((10, 7, 13)):
        rows = np.arange(start, start + count)
        table = pa.table({"a": rows.astype(float), "b": -rows.astype(float), "label": rows % 3})
        pq.write_table(table, tmp_path / f"part-{index}.parquet")
        start += count
    return tmp_path


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_workers_get_equal_disjoint_shares(split: Path, world: int) -> None:
    shares = [ShardInMemory.read_share(str(split), rank, world, _tensors) for rank in range(world)]
    sizes = {len(share.y) for share in shares}
    assert sizes == {30 // world}  # equal steps for DDP
    seen = torch.cat([share.x[:, 0] for share in shares]).long().tolist()
    assert seen == list(range(30 // world * world))  # disjoint, in order, nothing invented
    for share in shares:
        assert torch.equal(share.y, share.x[:, 0].long() % 3)  # labels stay with their rows


def test_each_epoch_reshuffles_every_row_once(split: Path) -> None:
    share = ShardInMemory.read_share(str(split), 0, 1, _tensors)
    epochs = [
        torch.cat([x[:, 0] for x, _ in share.shuffled(batch_size=8, seed=seed)]).long().tolist()
        for seed in (1, 2)
    ]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(30))
    assert epochs[0] != epochs[1]
    batches = [len(y) for _, y in share.in_order(batch_size=8)]
    assert batches == [8, 8, 8, 6]
