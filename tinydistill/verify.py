"""``tinydistill verify``: replay stored views, re-run the teacher, compare with the store.

Each sampled view is recomputed inside the very batch gen-logits ran it in (batches are always
the same shard-relative runs of ``batch_size`` rows), so on the same hardware, dtype and thread count the
recomputed fp16 log-probabilities equal the stored ones bit for bit. Elsewhere, pass a
tolerance: ``--max-logp-diff`` and ``--min-id-agreement``. A store with attention maps has them
recomputed too, coded as the store codes them, and compared cell by cell
(``--max-attention-diff``, in units of the map's mass).
"""

from __future__ import annotations

import numpy as np
import torch

from .cuda import select_device
from .dist import keeps_threads
from .errors import TinydistillError
from .sources import open_source
from .store import open_store, stored_logp
from .teachers import load_teacher
from .replay import check_replay
from .views import Views


@keeps_threads
def verify_store(path: str, data: str, teacher_name: str, weights: str | None = None, samples: int = 64,
                 seed: int = 0, device: str = "cpu", amp: str | None = None, render: str | None = None,
                 allow_renderer_change: bool = False, decode: str = "auto") -> dict:
    device = str(select_device(device))  # cuda:N made the current device: events and nvjpeg go there
    store = open_store(path)
    source = open_source(data)
    spec = check_replay(store, source, render, allow_renderer_change, device, decode)
    t_attrs = store.attrs.get("teacher", {})
    teacher = load_teacher(teacher_name, weights, class_names=source.class_names,
                           input_size=t_attrs.get("input_size"))
    if t_attrs.get("weights_digest") not in (None, teacher.weights_digest):
        raise TinydistillError(f"{path}: store was made with teacher weights {t_attrs.get('weights_digest')}, "
                               f"these are {teacher.weights_digest}")
    teacher.input_size = int(t_attrs.get("input_size", teacher.input_size))
    amp = amp or t_attrs.get("amp", "none")
    if torch.device(device).type == "cpu" and t_attrs.get("cpu_threads"):
        torch.set_num_threads(int(t_attrs["cpu_threads"]))  # CPU sums depend on the thread count
    batch_size = int(t_attrs.get("batch_size", 64))
    mask = store.complete_mask(refresh=True)
    done = np.argwhere(mask)
    if not len(done):
        raise TinydistillError(f"{path}: no complete units to verify")
    rng = np.random.default_rng(seed)
    # `samples` distinct views of the complete units (all of them when they are fewer)
    bounds = [store.shard_bounds(int(s)) for _, s in done]
    sizes = np.array([b - a for a, b in bounds], np.int64)
    ends = np.cumsum(sizes)
    flat = rng.choice(int(ends[-1]), size=min(samples, int(ends[-1])), replace=False)
    picks = []
    for f in flat.tolist():
        u = int(np.searchsorted(ends, f, side="right"))
        picks.append((int(done[u][0]), int(done[u][1]), bounds[u][0] + f - int(ends[u] - sizes[u])))
    # the batches gen-logits ran these views in: (epoch, shard, batch index within the unit)
    batches = sorted({(e, s, (r - store.shard_bounds(s)[0]) // batch_size) for e, s, r in picks})
    core = Views(source, spec, store.base_seed, skip_bad=True, device=device, decode=decode)
    compiled = bool(t_attrs.get("compile", False))  # the store's own graph: compiled values differ from eager
    attention = store.kind("attention")
    teacher.place(device, amp, compile=compiled, attention_grid=attention.grid if attention else 0)
    want = {(e, r) for e, _, r in picks}
    got_rows, same_ids, max_diff, map_diff = 0, 0, 0.0, 0.0
    for e, s, bi in batches:
        a, b = store.shard_bounds(s)
        rows = range(a + bi * batch_size, min(a + (bi + 1) * batch_size, b))
        rendered = core.render(e, rows)
        out = {k: v.cpu().numpy() for k, v in teacher.targets(rendered.image, store.kinds,
                                                               pad_to=batch_size if compiled else None).items()}
        lp, ix = out["logp"], out["index"]
        order = np.argsort(ix, axis=1)
        ix = np.take_along_axis(ix, order, 1)
        lp = stored_logp(np.take_along_axis(lp, order, 1)).astype(np.float32)  # as the store rounds them
        stored = store.targets(e, np.array(list(rows)))
        s_lp, s_ix = stored["logp"], stored["index"]
        if attention is not None:  # as the store codes them, then the largest |delta| of a cell (map mass)
            new_maps = attention.from_codes(attention.to_codes(out["attention"]))
        for j, r in enumerate(rows):
            if (e, r) not in want or not bool(rendered.valid[j]):
                continue
            got_rows += 1
            if attention is not None:
                map_diff = max(map_diff, float(np.abs(new_maps[j] - stored["attention"][j]).max()))
            new_ix, new_lp = ix[j], lp[j]
            if np.array_equal(new_ix, s_ix[j]):
                same_ids += 1
                max_diff = max(max_diff, float(np.abs(new_lp - s_lp[j]).max()))
            else:
                common, ia, ib = np.intersect1d(new_ix, s_ix[j], return_indices=True)
                if len(common):
                    max_diff = max(max_diff, float(np.abs(new_lp[ia] - s_lp[j][ib]).max()))
    extra = {"max_abs_attention_diff": map_diff} if attention is not None else {}
    return {"store": path, "views_checked": got_rows, "topk_id_agreement": same_ids / max(got_rows, 1),
            "max_abs_logp_diff": max_diff, **extra, "amp": amp, "compile": compiled, "device": device, "renderer": spec.renderer}
