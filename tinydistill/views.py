"""The view stream both stages share: (epoch, row) -> the same pixels, in any process.

Work is split in units of whole row blocks of one epoch (the store's shards for gen-logits,
its chunks for a student). Units are shuffled per epoch by a seed, split across ranks and
DataLoader workers, and each unit decodes every image once. Inside a unit, rows are handled
in mix groups (``spec.mix_group`` aligned rows, inside one store chunk): the group's images
are augmented under their own seeds and, when mixing is on, each view is mixed with its
partner from a seeded pairing of the group. Nothing depends on which process, worker, batch
or unit order produced a view.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .augment import AugSpec, ViewMaker, mix_pairs
from .dist import rank_world
from .errors import TinydistillError
from .seeds import encode_seed
from .sources import BadSampleError, Source


class ReplayError(TinydistillError):
    """The data, spec or libraries no longer give the views the teacher saw."""


@dataclass
class View:
    """One rendered view, as the teacher saw it before its own resize and normalisation."""

    epoch: int
    row: int
    key: str
    seed: int
    image: torch.Tensor  # float32 [3, H, W], pixels in [0, 1]
    label: int
    partner: int  # row mixed in (== row when not mixed)
    partner_label: int
    lam: float  # weight of this row's image (1.0 when not mixed)

    def to_pil(self):
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(self.image.clamp(0, 1))

    # notebook display; self-contained (numpy + Pillow only) so it can move with the class
    def __repr__(self) -> str:
        shape = "x".join(str(d) for d in getattr(self.image, "shape", ()))
        mixed = (f", mixed with row {self.partner} (label {self.partner_label}) at lam={self.lam:.3f}"
                 if self.partner != self.row else "")
        return (f"View(epoch={self.epoch}, row={self.row}, key={self.key!r}, label={self.label}"
                f"{mixed}, image {shape})")

    def _repr_png_(self) -> bytes:
        """PNG for Jupyter: the view, enlarged to at least 160 px, over a caption naming the
        label and, for a mixed view, the partner row, its label and the mixing weights."""
        import io

        from PIL import Image, ImageDraw

        img = self.image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        pic = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        scale = max(1, -(-160 // max(1, min(pic.size))))
        pic = pic.convert("RGB").resize((pic.width * scale, pic.height * scale), Image.NEAREST)
        lines = [f"epoch {self.epoch}, row {self.row}, label {self.label}"]
        if self.partner != self.row:
            lines.append(f"{self.lam:.2f} x this + {1 - self.lam:.2f} x row {self.partner} (label {self.partner_label})")
        width = max(pic.width, 7 * max(len(s) for s in lines) + 8)
        canvas = Image.new("RGB", (width, pic.height + 14 * len(lines) + 6), "white")
        canvas.paste(pic, ((width - pic.width) // 2, 0))
        draw = ImageDraw.Draw(canvas)
        for i, s in enumerate(lines):
            draw.text((4, pic.height + 3 + 14 * i), s, fill="black")
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        return buf.getvalue()


class ViewStream(IterableDataset):
    """IterableDataset of views over (epoch, unit) work units.

    Yields dicts: ``epoch``, ``row``, ``seed``, ``image`` (float32 [3, S, S]), ``label``,
    ``partner``, ``partner_label``, ``lam``, ``valid`` (False for a skipped unreadable image,
    whose ``image`` is zeros). Collate with a plain DataLoader; rows come in unit order.

    With ``batch_size`` it yields collated batches instead (use ``DataLoader(batch_size=None)``):
    each unit is cut into the same consecutive batches whatever else runs, so a model's
    outputs for a unit do not depend on which units ran before it (resume, ranks, workers).
    """

    def __init__(
        self,
        source: Source,
        spec: AugSpec,
        base_seed: int,
        epochs: Iterable[int],
        unit_rows: int,
        units: Iterable[tuple[int, int]] | None = None,
        order_seed: int | None = None,
        skip_bad: bool = False,
        batch_size: int | None = None,
        targets=None,
    ):
        self.source, self.spec, self.base_seed = source, spec, int(base_seed)
        self.batch_size = batch_size
        self.targets = targets  # a LogitStore: attach each view's stored top-K (read a unit at a time)
        self.num_rows = len(source)
        self.unit_rows = int(unit_rows)
        if self.unit_rows % spec.mix_group and self.unit_rows < self.num_rows:
            raise ReplayError(f"unit of {unit_rows} rows is not a multiple of mix_group={spec.mix_group}")
        self.skip_bad = skip_bad
        self.num_units = -(-self.num_rows // self.unit_rows)
        seed = self.base_seed if order_seed is None else int(order_seed)
        wanted = None if units is None else {(int(e), int(u)) for e, u in units}
        self.units = [
            (e, int(u))
            for e in epochs
            for u in np.random.default_rng([seed, 0x6F72, int(e)]).permutation(self.num_units)
            if wanted is None or (e, int(u)) in wanted
        ]
        self._maker: ViewMaker | None = None

    @property
    def maker(self) -> ViewMaker:
        if self._maker is None:  # built lazily, inside each worker
            self._maker = ViewMaker(self.spec, self.base_seed)
        return self._maker

    def unit_bounds(self, unit: int) -> tuple[int, int]:
        lo = unit * self.unit_rows
        return lo, min(lo + self.unit_rows, self.num_rows)

    def my_units(self) -> list[tuple[int, int]]:
        """The units this rank and DataLoader worker handle (a strided share)."""
        rank, world = rank_world()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        return self.units[rank * nw + wid :: world * nw]

    def rank_views(self, num_workers: int) -> int:
        """How many views this rank yields in total over its ``num_workers`` DataLoader workers."""
        rank, world = rank_world()
        nw = max(num_workers, 1)
        units = [u for w in range(nw) for u in self.units[rank * nw + w :: world * nw]]
        return sum(b - a for _, u in units for a, b in [self.unit_bounds(u)])

    def __len__(self) -> int:
        return sum(b - a for _, u in self.units for a, b in [self.unit_bounds(u)])

    def __iter__(self) -> Iterator[dict]:
        from torch.utils.data import default_collate

        for epoch, unit in self.my_units():
            lo, hi = self.unit_bounds(unit)
            views = self.rows_views(epoch, range(lo, hi))
            if self.targets is not None:
                views = self._with_targets(views, epoch, lo, hi)
            if not self.batch_size:
                yield from views
                continue
            batch = []
            for v in views:
                batch.append(v)
                if len(batch) == self.batch_size:
                    yield default_collate(batch)
                    batch = []
            if batch:
                yield default_collate(batch)

    def _with_targets(self, views: Iterator[dict], epoch: int, lo: int, hi: int) -> Iterator[dict]:
        logp, index = self.targets.topk(epoch, slice(lo, hi), order="stored")  # one block read
        for v in views:
            r = v["row"] - lo
            v["logp"], v["index"] = torch.from_numpy(logp[r]), torch.from_numpy(index[r])
            v["valid"] = v["valid"] and not bool(np.isnan(logp[r, 0]))
            yield v

    def rows_views(self, epoch: int, rows: Sequence[int]) -> Iterator[dict]:
        """Views of the given rows of one epoch (ascending), rendering partners as needed."""
        g = self.spec.mix_group
        rows = sorted(int(r) for r in rows)
        start = 0
        while start < len(rows):
            group = rows[start] // g
            end = start
            while end < len(rows) and rows[end] // g == group:
                end += 1
            yield from self._group_views(epoch, group, rows[start:end])
            start = end

    def _group_views(self, epoch: int, group: int, rows: list[int]) -> Iterator[dict]:
        g = self.spec.mix_group
        members = np.arange(group * g, min((group + 1) * g, self.num_rows))
        if self.spec.mixing:
            partner = mix_pairs(self.base_seed, epoch, group, members)
        else:
            partner = {r: r for r in rows}
        need = sorted(set(rows) | {partner[r] for r in rows})
        base: dict[int, torch.Tensor | BadSampleError] = {}
        for r, img in self.source.read(need):
            if isinstance(img, BadSampleError):
                if not self.skip_bad:
                    raise img
                base[r] = img
            else:
                base[r] = self.maker.base(img, int(encode_seed(epoch, r, self.num_rows)))
        labels = self.source.labels
        size = self.spec.img_size
        for r in rows:
            seed = int(encode_seed(epoch, r, self.num_rows))
            x = base[r]
            p = partner[r]
            if isinstance(x, BadSampleError):
                yield dict(epoch=epoch, row=r, seed=seed, image=torch.zeros(3, size, size), label=int(labels[r]),
                           partner=r, partner_label=int(labels[r]), lam=1.0, valid=False)
                continue
            lam = 1.0
            if p != r and not isinstance(base[p], BadSampleError):
                x, lam = self.maker.mix(x, base[p], seed)
            if lam == 1.0:
                p = r
            yield dict(epoch=epoch, row=r, seed=seed, image=x, label=int(labels[r]), partner=p,
                       partner_label=int(labels[p]), lam=float(lam), valid=True)


def render_views(source: Source, spec: AugSpec, base_seed: int, views: Sequence[tuple[int, int]],
                 skip_bad: bool = False) -> list[dict]:
    """Render specific (epoch, row) views, in the order asked, exactly as the stream does."""
    stream = ViewStream(source, spec, base_seed, epochs=[], unit_rows=spec.mix_group, skip_bad=skip_bad)
    by_epoch: dict[int, list[int]] = {}
    for e, r in views:
        if not 0 <= int(r) < len(source):
            raise IndexError(f"row {r} out of range [0, {len(source)})")
        by_epoch.setdefault(int(e), []).append(int(r))
    out = {}
    for e, rows in by_epoch.items():
        for v in stream.rows_views(e, sorted(set(rows))):
            out[e, v["row"]] = v
    return [out[int(e), int(r)] for e, r in views]


def prepare(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
            interpolation: str = "bicubic") -> torch.Tensor:
    """What a consumer does with views: resize to its own input size, then normalise.

    Views are rendered once at the store's size; a teacher or student with another input
    size resizes here (antialiased), on whatever device ``images`` is on.
    """
    x = images.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        mode = interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"
        x = torch.nn.functional.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


# ---- replay canary ------------------------------------------------------------------------------

def canary_views(num_rows: int, epochs: int) -> list[tuple[int, int]]:
    """A few fixed views spread over the store: first and last epoch, start and middle rows."""
    cand = [(0, 0), (0, num_rows // 2), (epochs - 1, min(1, num_rows - 1)), (epochs - 1, num_rows - 1)]
    return sorted(set(cand))


def views_digest(views: Sequence[dict]) -> str:
    """sha256 over the exact pixels (float32 bytes), mix partners and lambdas of views."""
    h = hashlib.sha256()
    for v in views:
        h.update(np.ascontiguousarray(v["image"].numpy(), dtype=np.float32).tobytes())
        h.update(f"{v['epoch']},{v['row']},{v['partner']},{v['lam']!r},{v['valid']}".encode())
    return h.hexdigest()


def make_canary(source: Source, spec: AugSpec, base_seed: int, epochs: int) -> dict:
    """The canary record a new store keeps: which views, and the digest of their pixels."""
    views = canary_views(len(source), epochs)
    return {"views": [list(v) for v in views],
            "digest": views_digest(render_views(source, spec, base_seed, views, skip_bad=True))}


def check_replay(store, source: Source) -> AugSpec:
    """Refuse to replay a store whose data, spec or rendered canary views no longer match.

    Returns the store's augmentation spec for the caller to render with.
    """
    from ._util import library_versions

    attrs = store.attrs
    if source.fingerprint != attrs.get("dataset_fingerprint"):
        keys = list(store.keys)
        if len(keys) != len(source):
            why = f"{len(source)} samples, the store has {len(keys)}"
        else:
            i = next((i for i, (a, b) in enumerate(zip(keys, source.keys)) if a != b), None)
            why = f"row {i} is {source.keys[i]!r}, the store has {keys[i]!r}" if i is not None else "keys differ"
        raise ReplayError(f"{store.path}: data {source.name} is not the data the store was made from ({why})")
    try:
        spec = AugSpec.from_dict(attrs.get("augmentation", {}), source=f"{store.path} augmentation")
    except TinydistillError as e:
        raise ReplayError(str(e)) from e
    if spec.hash != attrs.get("spec_hash"):
        raise ReplayError(f"{store.path}: stored augmentation does not match its hash "
                          f"({spec.hash[:12]} != {str(attrs.get('spec_hash'))[:12]})")
    canary = attrs.get("canary")
    if not canary:
        raise ReplayError(f"{store.path}: store has no replay canary; it cannot be checked for replay")
    views = [tuple(v) for v in canary["views"]]
    digest = views_digest(render_views(source, spec, int(attrs.get("base_seed", 0)), views, skip_bad=True))
    if digest != canary["digest"]:
        then, now = attrs.get("versions", {}), library_versions()
        diff = [f"{k} {then.get(k)} -> {now.get(k)}" for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
        raise ReplayError(
            f"{store.path}: replayed canary views differ from what the teacher saw (spec {spec.hash[:12]}); "
            + (f"library versions differ: {', '.join(diff)}" if diff else "same library versions: the view code or data changed")
        )
    return spec


def create_view_store(path, source: Source, spec: AugSpec, *, base_seed: int, epochs: int, k: int,
                      num_classes: int | None = None, teacher: dict | None = None, **kwargs):
    """Create a store for the views of ``source`` under ``spec``: keys, labels, class names,
    the spec and its hash, the base seed and the replay canary all come from here."""
    from .store import DEFAULT_CHUNK_ROWS, create_store

    chunk_rows = kwargs.pop("chunk_rows", DEFAULT_CHUNK_ROWS)
    if chunk_rows % spec.mix_group:
        raise ReplayError(f"chunk_rows={chunk_rows} must be a multiple of mix_group={spec.mix_group}")
    num_classes = num_classes or source.num_classes
    names = source.class_names if len(source.class_names) == num_classes else None
    attrs = {"data": source.name, "canary": make_canary(source, spec, base_seed, epochs), **kwargs.pop("attrs", {})}
    return create_store(path, num_classes=num_classes, k=k, epochs=epochs, keys=source.keys,
                        labels=source.labels, class_names=names, teacher=teacher,
                        augmentation=spec.to_dict(), base_seed=base_seed, chunk_rows=chunk_rows,
                        attrs=attrs, **kwargs)
