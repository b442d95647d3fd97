"""The grain input pipeline: source records -> normalised, padded, canvas-grouped numpy batches.

    it = build_iterator(source, batch_size=8, canvases=[(800, 1088), (1088, 800)],
                        min_size=800, max_size=1333, max_gt=100, train=True, seed=0)
    batch = next(it)
    state = it.get_state()       # JSON-serialisable; it.set_state(state) resumes exactly
    it.close()                   # stops grain's threads / worker processes (or: with build_iterator(...) as it)

num_workers > 0 starts grain worker processes, which read absl flags: parse them first
(absl.app.run does; scripts and notebooks call absl.flags.FLAGS.mark_as_parsed()).

Batch (numpy), B = batch_size, G = max_gt, (Hc, Wc) the batch's canvas:

| key | value |
| --- | --- |
| "image" | float32 [B, Hc, Wc, 3]: RGB / 255, ImageNet mean/std, zero padding, image top-left |
| "image_size" | int32 [B, 2] (h, w) of the resized image inside the canvas |
| "orig_size" | int32 [B, 2] original (h, w) |
| "boxes" | float32 [B, G, 4] (x1, y1, x2, y2) in canvas pixels (zeros in padding) |
| "labels" | int32 [B, G] 1..K, 0 in padding |
| "gt_valid" | bool [B, G] real ground-truth rows (crowd boxes included) |
| "is_crowd", "difficult" | bool [B, G] |
| "image_id" | int64 [B] the dataset's image id (-1 for padding examples) |
| "valid" | bool [B] False for the padding examples that fill an eval batch |
| "gt_masks" | only with mask_size = S > 0: uint8 [B, G, S, S] each instance's mask cropped to its crop box, round(255 x value) (`masks.crop_instance_masks`; zeros in padding) |
| "gt_mask_boxes" | only with mask_size > 0: float32 [B, G, 4] the crop boxes (x1, y1, x2, y2) in canvas pixels |

Per image (`_PrepareExample`, in the grain workers): read the record, choose min_size
(training with a tuple: one value per image, drawn from the image's RNG like torchvision's
random choice; eval: the last value, as torchvision), resize like torchvision
(`transforms.resize_image`), flip horizontally with p = 0.5 (training with hflip), normalise, choose
the smallest canvas that holds the resized image and pad the targets to G rows
(`transforms.pad_targets`, truncation logged). Crowd boxes stay in the targets with
`is_crowd` True (the training step ignores them). Padding examples of eval batches have
image_size = orig_size = the canvas size (never zero), zero images and no valid targets.

Order, grouping and determinism:
- Training reads one global stream: the whole source shuffled with `seed` and repeated
  forever with a new shuffle each epoch. Global batch k is stream positions
  [k * B, (k + 1) * B) for the global batch B = batch_size * shard_count, and host
  `shard_index` prepares rows [shard_index * batch_size, (shard_index + 1) * batch_size)
  of it. So the global batches, and the trained parameters, are the same for any number
  of hosts (multi-host training needs a single canvas, checked). The image at a stream
  position and its augmentation (drawn from `default_rng([seed, 0, position])`) depend
  only on the seed and the position.
- Eval reads each host's shard (`shard_index::shard_count` of the source, disjoint
  across hosts) in order, once.
- grain reads positions in order (threads in-process, or `num_workers` processes each
  taking every num_workers-th position, interleaved back in order), so the stream of
  prepared images is the same for any number of workers.
- Grouping by canvas runs in the consuming process on that ordered stream: each image
  joins the pending group of its canvas, and a group is emitted as a batch as soon as it
  holds batch_size images (Detectron2's AspectRatioGroupedDataset, keyed by canvas). So
  portrait and landscape images batch separately, and the batches, their order and their
  canvases are a function of the seed only: identical with 0 or N workers.
- Eval: every image of the shard exactly once; batches come out as groups fill, so with
  one canvas the order is exactly the source order, with several the order within each
  canvas is kept. At the end, the partial groups are emitted in the order of their first
  image, padded with `valid=False` examples. Each shard's stream is padded to
  ceil(len / shard_count) positions (padding examples use the first canvas), so with a
  single canvas every host yields the same number of batches.
- State: `get_state()` holds grain's reader state plus the positions of the images in the
  partial groups (plain ints, JSON-serialisable). `set_state()` restores the reader and
  re-prepares those few images from their positions (deterministic), so a resumed run
  continues with exactly the batches it would have produced.

Multi-host caveat: each host groups its own images, so with several canvases two hosts
may emit batches of different canvases at the same step; code that assembles one global
array per step needs a single canvas (e.g. a square one holding both orientations) or
its own agreement across hosts.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from frcnn_jax.data.masks import crop_instance_masks, pad_masks
from frcnn_jax.data.transforms import (
    check_canvases,
    choose_canvas,
    normalize,
    pad_targets,
    resize_boxes,
    resize_image,
)
from frcnn_jax.data.transforms import hflip as flip_horizontally

BATCH_KEYS = (
    "image", "image_size", "orig_size", "boxes", "labels", "gt_valid", "is_crowd", "difficult", "image_id", "valid",
)  # fmt: skip
MASK_BATCH_KEYS = ("gt_masks", "gt_mask_boxes")  # added with mask_size > 0


class _PrepareExample:
    """(host position, (stream position, source index)) -> one prepared image (picklable: grain workers run it).

    The host position addresses the example in this host's dataset (kept in the iterator
    state); the stream position keys the augmentation. Returns a dict: "image" float32
    [h, w, 3] normalised (unpadded), "canvas" int32 [2], "image_size", "orig_size" int32
    [2], the padded targets of `pad_targets`, "image_id" int64, "position" int64 (the host
    position), "valid" bool. Source index -1 gives a padding example.
    """

    def __init__(self, source, *, seed, train, min_sizes, max_size, canvases, max_gt, hflip=True, mask_size=0):
        self.source = source
        self.seed, self.train, self.hflip = seed, train, hflip
        self.min_sizes, self.max_size = min_sizes, max_size
        self.canvases, self.max_gt = canvases, max_gt
        self.mask_size = mask_size

    def __call__(self, position: int, item) -> dict:
        stream_position, source_index = int(item[0]), int(item[1])
        if source_index < 0:
            return self.padding(self.canvases[0], position)
        ex = self.source[source_index]
        image, image_id = ex["image"], ex["image_id"]
        if self.train:
            rng = np.random.default_rng([self.seed, 0, stream_position])
            min_size = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
            flip = bool(rng.random() < 0.5) and self.hflip  # drawn either way: hflip keeps the other draws
        else:
            min_size, flip = self.min_sizes[-1], False
        orig_hw = image.shape[:2]
        resized, new_hw = resize_image(image, min_size, self.max_size)
        boxes = resize_boxes(ex["boxes"], orig_hw, new_hw)
        if flip:
            resized, boxes = flip_horizontally(resized, boxes)
        try:
            canvas = choose_canvas(new_hw[0], new_hw[1], self.canvases)
        except ValueError as e:
            raise ValueError(f"image id {image_id} (original (h, w)={tuple(orig_hw)}): {e}") from None
        normalize(resized, out=resized)
        out = pad_targets(
            boxes, ex["labels"], ex["is_crowd"], self.max_gt, difficult=ex["difficult"], image_id=image_id
        )
        if self.mask_size:
            # Only the rows pad_targets keeps are cropped; the crops follow the resize and flip above.
            k = min(len(boxes), self.max_gt)
            crops, crop_boxes = crop_instance_masks(
                ex["masks"][:k], new_hw, flip, self.mask_size, fallback_boxes=boxes[:k]
            )
            out.update(pad_masks(crops, crop_boxes, self.max_gt))
        out.update(
            image=np.ascontiguousarray(resized),
            canvas=np.asarray(canvas, np.int32),
            image_size=np.asarray(new_hw, np.int32),
            orig_size=np.asarray(orig_hw, np.int32),
            image_id=np.int64(image_id),
            position=np.int64(position),
            valid=np.bool_(True),
        )
        return out

    def padding(self, canvas, position=-1) -> dict:
        """An invalid example for `canvas`: no image, no targets, sizes = canvas."""
        out = pad_targets(np.zeros((0, 4)), np.zeros(0), np.zeros(0), self.max_gt)
        if self.mask_size:
            out.update(pad_masks(np.zeros((0, self.mask_size, self.mask_size)), np.zeros((0, 4)), self.max_gt))
        out.update(
            image=np.zeros((0, 0, 3), np.float32),
            canvas=np.asarray(canvas, np.int32),
            image_size=np.asarray(canvas, np.int32),
            orig_size=np.asarray(canvas, np.int32),
            image_id=np.int64(-1),
            position=np.int64(position),
            valid=np.bool_(False),
        )
        return out


def collate(examples: Sequence[dict], canvas: tuple[int, int], batch_size: int, prepare: _PrepareExample) -> dict:
    """Stacks prepared examples of one canvas into a batch of `batch_size`, padding with invalid ones."""
    examples = list(examples) + [prepare.padding(canvas) for _ in range(batch_size - len(examples))]
    image = np.zeros((batch_size, canvas[0], canvas[1], 3), np.float32)
    for i, ex in enumerate(examples):
        if ex["valid"]:
            h, w = ex["image"].shape[:2]
            image[i, :h, :w] = ex["image"]
    batch = {"image": image}
    for key in BATCH_KEYS[1:] + (MASK_BATCH_KEYS if prepare.mask_size else ()):
        batch[key] = np.stack([ex[key] for ex in examples])
    return batch


class _CanvasBatchIterator(grain.DatasetIterator):
    """Groups an ordered stream of prepared examples into one-canvas batches (see module doc)."""

    def __init__(self, parent, examples, prepare, batch_size: int, train: bool):
        super().__init__(parent)
        self._examples = examples  # the MapDataset: position -> prepared example (for set_state)
        self._prepare = prepare
        self._batch_size = batch_size
        self._train = train
        self._pending: dict[tuple[int, int], list[dict]] = {}
        self._exhausted = False

    def __next__(self) -> dict:
        while not self._exhausted:
            try:
                ex = next(self._parent)
            except StopIteration:
                if self._train:
                    raise
                self._exhausted = True
                break
            canvas = (int(ex["canvas"][0]), int(ex["canvas"][1]))
            group = self._pending.setdefault(canvas, [])
            group.append(ex)
            if len(group) == self._batch_size:
                del self._pending[canvas]
                return collate(group, canvas, self._batch_size, self._prepare)
        if not self._pending:
            raise StopIteration
        canvas = next(iter(self._pending))  # the partial group whose first image came first
        return collate(self._pending.pop(canvas), canvas, self._batch_size, self._prepare)

    def get_state(self) -> dict:
        return {
            "reader": self._parent.get_state(),
            "pending": [[h, w, [int(ex["position"]) for ex in group]] for (h, w), group in self._pending.items()],
            "exhausted": self._exhausted,
        }

    def set_state(self, state: dict):
        self._parent.set_state(state["reader"])
        self._pending = {
            (int(h), int(w)): [self._examples[int(p)] for p in positions] for h, w, positions in state["pending"]
        }
        self._exhausted = bool(state["exhausted"])


class _CanvasBatchDataset(grain.IterDataset):
    def __init__(self, parent, examples, prepare, batch_size: int, train: bool):
        super().__init__(parent)
        self._examples, self._prepare = examples, prepare
        self._batch_size, self._train = batch_size, train

    def __iter__(self):
        parent = self._parent.__iter__()
        return _CanvasBatchIterator(parent, self._examples, self._prepare, self._batch_size, self._train)

    def __str__(self) -> str:
        return f"CanvasBatchDataset(batch_size={self._batch_size}, train={self._train})"


def _check_absl_flags_parsed(num_workers: int) -> None:
    """grain (0.2.x) reads its absl flags when it starts worker processes; unparsed flags make that fail."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        raise ValueError(
            f"num_workers={num_workers}: grain's worker processes read absl flags, which are not parsed yet; run "
            "under absl.app.run, or parse them first (absl.flags.FLAGS(sys.argv), or FLAGS.mark_as_parsed() to keep "
            "the defaults), or use num_workers=0"
        )


def build_dataset(
    source: Any,
    *,
    batch_size: int,
    canvases: Sequence[Sequence[int]],
    min_size: int | Sequence[int],
    max_size: int,
    max_gt: int = 100,
    train: bool,
    hflip: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    num_threads: int = 2,
    prefetch_batches: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
    mask_size: int = 0,
) -> grain.IterDataset:
    """The input pipeline as a grain `IterDataset` of numpy batches (format in the module doc).

    Args:
      source: random-access records (`len`, `source[i]`; see `example.py`).
      batch_size: images per batch (per host).
      canvases: list of (H, W) canvas sizes, multiples of 32; each image goes to the
        smallest one that holds it after resizing.
      min_size: short side after resizing; a tuple for multi-scale training (one value drawn
        per image; eval uses the last).
      max_size: cap on the long side after resizing.
      max_gt: ground-truth rows per image (more are truncated with a warning).
      train: shuffle + repeat forever + random horizontal flip; else every image once, in order.
      hflip: training only: flip each image horizontally with p = 0.5 (False: never; the
        shuffle and the min_size draws are the same either way).
      seed: shuffle and augmentation seed (0 <= seed < 2**32).
      num_workers: 0 prepares images in this process (`num_threads` threads); N > 0 uses
        N grain worker processes. The batches are the same for every value.
      num_threads: threads preparing images in each process.
      prefetch_batches: batches assembled ahead in a background thread (0: none).
      shard_index, shard_count: this host and the number of hosts (default
        `jax.process_index()`, `jax.process_count()`): training prepares this host's rows
        of each global batch, eval this host's shard of the source (see the module doc).
      mask_size: S > 0 adds "gt_masks" and "gt_mask_boxes" (instance masks cropped at S x S,
        see `masks.py`); the source must give masks (built with masks=True). 0: boxes only.
    Returns:
      grain.IterDataset; `iter(ds)` gives an iterator with `get_state()` / `set_state()`.
      Prefer `build_iterator`, whose `BatchIterator` also closes grain's workers at exit.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if num_workers < 0 or num_threads < 0 or prefetch_batches < 0:
        raise ValueError(
            f"num_workers, num_threads, prefetch_batches must be >= 0, got {num_workers}, {num_threads}, {prefetch_batches}"
        )
    min_sizes = (int(min_size),) if np.isscalar(min_size) else tuple(int(s) for s in min_size)
    if not min_sizes or min(min_sizes) < 1 or max_size < 1:
        raise ValueError(f"min_size and max_size must be >= 1, got min_size={min_size}, max_size={max_size}")
    canvases = check_canvases(canvases)
    mask_size = int(mask_size)
    if mask_size and (mask_size < 3 or not getattr(source, "masks", False)):
        why = "must be >= 3" if mask_size < 3 else f"{source!r} gives no instance masks (build it with masks=True)"
        raise ValueError(f"mask_size={mask_size}: {why}")
    if shard_index is None or shard_count is None:
        import jax  # only for the host defaults

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    n = len(source)
    if n == 0:
        raise ValueError(f"{source!r} has no records")
    if train and shard_count > 1 and len(canvases) > 1:
        raise ValueError(
            f"canvases={canvases!r}: training on {shard_count} hosts needs a single canvas (each host groups its "
            "own images by canvas, so the hosts' rows of a global batch could differ in shape)"
        )

    prepare = _PrepareExample(
        source, seed=seed, train=train, min_sizes=min_sizes,
        max_size=int(max_size), canvases=canvases, max_gt=int(max_gt), hflip=bool(hflip), mask_size=mask_size,
    )  # fmt: skip
    if train:
        stream = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
        rows, global_batch = batch_size, batch_size * shard_count

        def stream_item(q):  # host position q -> (stream position, source index)
            position = (q // rows) * global_batch + shard_index * rows + q % rows
            return position, stream[position]

        indices = grain.MapDataset.range(len(stream) // shard_count).map(stream_item)
    else:
        # Pad every shard to the longest shard's length with padding positions (index -1).
        shard_len = len(range(shard_index, n, shard_count))
        per_host = -(-n // shard_count)
        indices = grain.MapDataset.range(per_host).map(
            lambda p: (p, shard_index + p * shard_count if p < shard_len else -1)
        )
    examples = indices.map_with_index(prepare)
    reader = examples.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * batch_size, num_threads))
    )
    if num_workers > 0:
        _check_absl_flags_parsed(num_workers)
        options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=batch_size)
        reader = reader.mp_prefetch(options)
    batches = _CanvasBatchDataset(reader, examples, prepare, batch_size, train)
    if prefetch_batches > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch_batches)
    return batches


class BatchIterator(grain.DatasetIterator):
    """The pipeline's iterator of batches: `next`, `get_state()` / `set_state()`, `close()`.

    `close()` stops grain's threads and worker processes and frees their shared memory
    (idempotent; later `next()` calls raise ValueError). An iterator that is not closed is
    closed when it is garbage-collected, or at interpreter exit through `weakref.finalize`,
    which runs before module teardown (grain's own `__del__` cleanup fails during teardown).
    Also a context manager (`with build_iterator(...) as it:`).
    """

    def __init__(self, dataset: grain.IterDataset):
        super().__init__()
        # The finalizer holds the only reference to grain's iterator chain, so closing releases
        # it at once (not at teardown).
        self._release = weakref.finalize(self, _close_chain, [dataset.__iter__()])

    def _chain(self) -> grain.DatasetIterator:
        alive = self._release.peek()
        if alive is None:
            raise ValueError("the batch iterator is closed")
        return alive[2][0][0]

    def __next__(self) -> dict:
        return next(self._chain())

    def get_state(self) -> dict:
        return self._chain().get_state()

    def set_state(self, state: dict):
        self._chain().set_state(state)

    def close(self) -> None:
        self._release()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __str__(self) -> str:
        return "BatchIterator"


def _close_chain(holder: list) -> None:
    """Closes grain's iterator chain (public `close()`) and drops it, collecting its reference cycles now."""
    holder.pop().close()
    gc.collect()


def build_iterator(source: Any, **kwargs) -> BatchIterator:
    """A `BatchIterator` over `build_dataset(source, **kwargs)`; `close()` it when done (or use `with`)."""
    return BatchIterator(build_dataset(source, **kwargs))
