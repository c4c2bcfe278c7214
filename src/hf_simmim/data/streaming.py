"""Training images read as a stream: a `datasets.IterableDataset` (Parquet/Arrow or WebDataset `.tar` shards, a
local folder, a hub dataset as it downloads), split across processes with `datasets.distributed.split_dataset_by_node`,
shuffled with a buffer, reshuffled every epoch, and resumable exactly.

`StreamingImageDataset` serves one process's share to a DataLoader as an endless sequence of samples: epoch after
epoch of the stream, each epoch shuffled by `datasets` (shard order and buffer) from `(seed, epoch)`, each example's
crop, flip and mask drawn from `(seed, epoch, process, DataLoader worker, position in the worker's epoch)`. Nothing
in it depends on the wall clock or on how far a previous run got, so the samples a process trains on are a
function of the run's seed and layout (processes, workers, batch size) alone.

Exact resumption is deterministic replay: a run resumed after `b` batches of each process has every DataLoader
worker read (without decoding) the examples of the batches it had served, then go on from the next one. The replay
costs one pass over the undecoded examples already trained on since the start of the run (reading and shuffling
rows, no image decoding or augmentation): `benchmarks/streaming_replay.py` measures it against the training data
path.

An image that cannot be decoded is skipped, reported (`image_ops.report_skipped_image`) and counted once as a
distinct image (`SkippedImages`); the next example of the stream whose image decodes stands in for it with its
seeds, so a batch keeps its size and a resumed run stays exact.
"""

import collections
import functools
import hashlib
import logging
import multiprocessing
from itertools import islice

import numpy as np
import torch

from .image_ops import cell_path, report_skipped_image
from .loading import array_dtype
from .pixels import cell_source
from .transforms import seeded_per_sample, seeded_sample

logger = logging.getLogger(__name__)


def undecoded_images(stream):
    """`stream` with its image columns left undecoded (`datasets.Image(decode=False)`), so that an image that cannot
    be decoded reaches the transform, which skips and counts it, instead of failing inside `datasets`."""
    import datasets

    for name, feature in (stream.features or {}).items():
        if isinstance(feature, datasets.Image) and feature.decode:
            stream = stream.cast_column(name, datasets.Image(decode=False))
    return stream


def stream_head(stream, count):
    """The first `count` examples of `stream` as a `datasets.Dataset` (images undecoded), to check and detect what
    the images are before training, and to draw pictures from."""
    import datasets

    stream = undecoded_images(stream)
    return datasets.Dataset.from_list(list(islice(stream, count)), features=stream.features)


def shards_per_process(num_shards, world_size):
    """How many shards `split_dataset_by_node` gives each process: an equal share when `world_size` divides
    `num_shards`; otherwise every process reads every shard and keeps one example in `world_size`."""
    return num_shards // world_size if num_shards % world_size == 0 else num_shards


class SkippedImages:
    """The distinct images a process found undecodable: 64-bit digests of their bytes (or path), in shared memory
    that DataLoader workers write (each its own row, so no lock is needed) and the process reads."""

    CAPACITY = 65536  # distinct undecodable images a worker may meet before the run stops: the data is broken

    def __init__(self, workers=1):
        self._digests = multiprocessing.Array("q", workers * self.CAPACITY, lock=False)
        self._counts = multiprocessing.Array("i", workers, lock=False)

    @staticmethod
    def digest(cell):
        """A cell's file name and bytes (or what it holds, when it names no file: e.g. an empty cell), hashed."""
        source, path = cell_source(cell), cell_path(cell) or ""
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else repr(cell).encode()
        digest = hashlib.blake2b(path.encode() + b"\0" + data, digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True)

    def add(self, worker, cell):
        start, count, digest = worker * self.CAPACITY, self._counts[worker], self.digest(cell)
        if digest in self._digests[start : start + count]:
            return
        if count == self.CAPACITY:
            raise ValueError(
                f"More than {self.CAPACITY} distinct images of the stream cannot be decoded: check the data."
            )
        self._digests[start + count] = digest
        self._counts[worker] = count + 1

    def digests(self):
        """The digests found so far, over every worker."""
        return {
            self._digests[worker * self.CAPACITY + i]
            for worker, count in enumerate(self._counts)
            for i in range(count)
        }


def collate_turn(collate_fn, rows):
    """`collate_fn(rows)`, or None for a turn a DataLoader worker passes (`StreamingImageDataset.__iter__`)."""
    return None if rows[0] is None else collate_fn(rows)


class Batches:
    """The batches of a DataLoader over a `StreamingImageDataset`, without the turns its workers pass."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return (batch for batch in self.loader if batch is not None)


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """One process's share of a stream of images, served through a `SimMIMTransform` with seeded crops and masks
    (see the module docstring). Iterate it through `dataloader()`, whose batches must not be split again (by
    accelerate): they are this process's already.

    Args:
        stream: a `datasets.IterableDataset` of the whole training set.
        transform: a `SimMIMTransform` for training.
        seed: the run's seed (shuffling, crops and masks).
        buffer_size: examples in the shuffle buffer (`IterableDataset.shuffle`) of each DataLoader worker.
        rank, world_size: this process and the number of processes (`split_dataset_by_node`).
        split: the split's name in the reports.
    """

    def __init__(self, stream, transform, seed=0, buffer_size=10_000, rank=0, world_size=1, split="train"):
        transform.require_image_column(stream.column_names or [transform.image_column, transform.mask_column])
        self.num_shards, self.world_size, self.rank = stream.num_shards, world_size, rank
        self.seed, self.buffer_size, self.split = int(seed), buffer_size, split
        if self.num_shards % world_size and rank == 0:
            logger.warning(
                "%d shard(s) for %d processes: each process reads every shard and keeps one example in %d. Write a "
                "multiple of %d shards (hf-simmim shard --shard_size) for each to read only its own.",
                self.num_shards, world_size, world_size, world_size,
            )
        self.stream = undecoded_images(stream)
        self.array_dtype = array_dtype((self.stream.features or {}).get(transform.image_column))
        self.transform = seeded_per_sample(transform)
        self.batch_size = 1
        self.start_batch = 0  # batches this process trained on before (a resumed run): replayed, not served
        self.skipped = SkippedImages()

    @property
    def shards_per_process(self):
        return shards_per_process(self.num_shards, self.world_size)

    def dataloader(self, batch_size, collate_fn, num_workers=0, **loader_kwargs):
        """The DataLoader of this process's batches (`loader_kwargs`: `pin_memory`, `prefetch_factor`, ...)."""
        if num_workers > self.shards_per_process:
            logger.warning(
                "%d DataLoader workers but %d shard(s) per process: %d worker(s) stay idle. Write more shards "
                "(hf-simmim shard --shard_size) for more parallel reading.", num_workers, self.shards_per_process,
                num_workers - self.shards_per_process,
            )
        self.batch_size = batch_size
        self.skipped = SkippedImages(max(1, num_workers))
        loader = torch.utils.data.DataLoader(
            self, batch_size=batch_size, collate_fn=functools.partial(collate_turn, collate_fn),
            num_workers=num_workers, **loader_kwargs,
        )
        return Batches(loader)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        active = min(workers, self.shards_per_process)  # datasets gives the other workers no shard
        if worker >= active:
            return
        # The DataLoader takes one batch from each active worker in turn, from worker 0 on: worker w served batches
        # w, w + active, ... of the run. A resumed run's next batch is worker `start_batch % active`'s: the workers
        # before it pass one turn (a placeholder batch that `Batches` drops).
        if worker < self.start_batch % active:
            yield from [None] * self.batch_size
        examples = self._examples(worker)
        for _ in range(len(range(worker, self.start_batch, active)) * self.batch_size):
            next(examples)  # replayed: read, not decoded
        yield from self._samples(examples, worker)

    def epoch_stream(self, epoch):
        """This process's share of the stream in `epoch`: shards and buffer shuffled with a seed drawn from `(seed,
        epoch)`, the same in every process, which then take disjoint shards (`split_dataset_by_node`). A new stream
        per epoch rather than `set_epoch`, whose epoch the DataLoader workers would share (each has its own)."""
        from datasets.distributed import split_dataset_by_node

        epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        shuffled = self.stream.shuffle(seed=epoch_seed, buffer_size=self.buffer_size)
        return split_dataset_by_node(shuffled, self.rank, self.world_size)

    def _examples(self, worker):
        """`(epoch, position, example)` of this worker's share, epoch after epoch, without end."""
        epoch = 0
        while True:
            position = -1
            for position, example in enumerate(self.epoch_stream(epoch)):
                yield epoch, position, example
            if position < 0:
                raise ValueError(
                    f"Process {self.rank}, DataLoader worker {worker} read no example in epoch {epoch} of a stream of "
                    f"{self.num_shards} shard(s): check the data, or use fewer processes or workers."
                )
            epoch += 1

    def _samples(self, examples, worker):
        pending = collections.deque()  # examples read ahead to find one that stands in for an undecodable image
        while True:
            epoch, position, example = pending.popleft() if pending else next(examples)
            seeds = [self.seed, epoch, self.rank, worker, position]
            sample, error = seeded_sample(self.transform, self._as_read(example), seeds)
            if error is not None:
                self._report(example, error, worker, epoch, position)
            ahead = 0
            while error is not None:  # the next example whose image decodes, drawn with this one's seeds
                if ahead == len(pending):
                    pending.append(next(examples))
                if pending[ahead][0] > epoch + 1:
                    raise ValueError(f"No image of the {self.split} stream can be decoded in a whole epoch.")
                sample, error = seeded_sample(self.transform, self._as_read(pending[ahead][2]), seeds)
                ahead += 1
            yield sample

    def _as_read(self, example):
        """An image of an array column as a NumPy array of its pixel type (`datasets` gives nested lists)."""
        if self.array_dtype is None:
            return example
        column = self.transform.image_column
        return {**example, column: np.asarray(example[column], dtype=self.array_dtype)}

    def _report(self, example, error, worker, epoch, position):
        cell = example[self.transform.image_column]
        path = cell_path(cell)
        where = (f"{self.split} stream example {position} of epoch {epoch} (process {self.rank}, worker {worker})"
                 + (f", {path}" if path else ""))
        report_skipped_image(where, error)
        self.skipped.add(worker, cell)
