"""The notebook side of a store: pandas and xarray tables, and a view as the teacher saw it.

:class:`NotebookMixin` is part of :class:`tinydistill.store.LogitStore`, so ``st.to_pandas``,
``st.to_xarray`` and ``st.view`` are store methods. pandas, xarray and the view machinery
(torch) are imported only when one of them is called.
"""

from __future__ import annotations

import numpy as np

from ..errors import IncompleteError
from .format import FORMAT_KEY


def _optional(module: str):
    """Import an optional notebook dependency, or fail in one line naming the package."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this needs {module}: pip install {module} "
                          f"(or pip install 'tinydistill[notebook]')") from None


class NotebookMixin:
    """:meth:`to_pandas`, :meth:`to_xarray` and :meth:`view`, built on the store's readers."""

    def to_pandas(self, epoch: int, rows=slice(None), k: int | None = None):
        """A pandas DataFrame, one line per (view, rank): ``epoch``, ``row``, ``key``, ``label``,
        ``label_name``, ``rank`` (0 = the teacher's top class), ``class_id``, ``class_name``,
        ``prob`` and ``logp``. ``rows`` as in :meth:`topk`; ``k`` keeps the first k ranks.
        Needs pandas (``pip install 'tinydistill[notebook]'``)."""
        pd = _optional("pandas")
        sel, _ = self._rows(epoch, rows)
        logp, ids = self.topk(epoch, sel)
        k = self.k if k is None else max(0, min(int(k), self.k))
        logp, ids = logp[:, :k], ids[:, :k]
        rows_ = np.arange(self.num_rows)[sel] if isinstance(sel, slice) else sel
        n = len(rows_)
        names = self._class_name_table()
        labels = self.labels[rows_]
        return pd.DataFrame({
            "epoch": np.full(n * k, int(epoch), np.int64),
            "row": np.repeat(rows_, k),
            "key": np.repeat(self.keys[rows_], k),
            "label": np.repeat(labels, k),
            "label_name": np.repeat(names[labels], k),
            "rank": np.tile(np.arange(k), n),
            "class_id": ids.reshape(-1),
            "class_name": names[ids.reshape(-1)],
            "prob": np.exp(logp.reshape(-1)),
            "logp": logp.reshape(-1),
        })

    def to_xarray(self, epochs=None, rows=slice(None)):
        """An in-memory xarray Dataset of the top-K outputs, dims (epoch, row, rank).

        Variables ``logp``, ``prob``, ``class_id`` and ``seed`` (and ``attention``, dims epoch,
        row, y, x, for a store with maps); coordinates ``epoch``,
        ``row``, ``rank`` (0 = top class), ``key``, ``label``, ``label_name`` per row and
        ``class_name`` per (epoch, row, rank). ``epochs`` defaults to every epoch whose
        selected rows are all written. It reads everything asked for into memory: select rows
        (a slice, indices, a boolean mask or keys) for large stores. Needs xarray
        (``pip install 'tinydistill[notebook]'``).
        """
        xr = _optional("xarray")
        sel, _ = self._rows(0, rows)
        rows_ = np.arange(self.num_rows)[sel] if isinstance(sel, slice) else sel
        if epochs is None:
            shards = np.unique(rows_ // self.shard_rows)
            epochs = [e for e in range(self.epochs) if self.complete_mask(refresh=True)[e, shards].all()]
            if not epochs:
                raise IncompleteError(f"{self.path}: no epoch has all the selected rows written yet")
        epochs = [int(e) for e in np.atleast_1d(epochs)]
        logp = np.empty((len(epochs), len(rows_), self.k), np.float32)
        ids = np.empty(logp.shape, np.int64)
        seed = np.empty((len(epochs), len(rows_)), np.uint64)
        grid = self.kind("attention").grid if self.kind("attention") is not None else 0
        maps = np.empty((len(epochs), len(rows_), grid, grid), np.float32) if grid else None
        for i, e in enumerate(epochs):
            logp[i], ids[i] = self.topk(e, sel)
            seed[i] = self.seeds(e, sel)
            if grid:
                maps[i] = self.attention(e, sel)
        names = self._class_name_table()
        labels = self.labels[rows_]
        keep = ("num_classes", "k", "epochs", "num_rows", "spec_hash", "dataset_fingerprint", "base_seed",
                "created", FORMAT_KEY)
        attrs = {a: self.attrs[a] for a in keep if a in self.attrs}
        attrs["teacher"] = str(self.teacher.get("name", ""))
        attrs["store"] = self.path
        dims = ("epoch", "row", "rank")
        extra = {} if maps is None else {"attention": (("epoch", "row", "y", "x"), maps, {
            "description": "the teacher's spatial attention map over the view, sums to 1; NaN = skipped view"})}
        return xr.Dataset(
            {"logp": (dims, logp, {"description": "teacher log-probability at T=1, by rank"}),
             "prob": (dims, np.exp(logp), {"description": "teacher probability, by rank"}),
             "class_id": (dims, ids, {"description": "class id; -1 = skipped view"}),
             "seed": (("epoch", "row"), seed, {"description": "encoded view seed"}), **extra},
            coords={"epoch": epochs, "row": rows_, "rank": np.arange(self.k),
                    "key": ("row", self.keys[rows_]), "label": ("row", labels),
                    "label_name": ("row", names[labels]),
                    "class_name": (dims, names[ids])},
            attrs=attrs,
        )

    def view(self, epoch: int, row: int, data):
        """The view (epoch, row) as the teacher saw it: a :class:`tinydistill.views.View`,
        with its parameter record in ``.params`` and, when the store holds maps, the teacher's
        attention over it in ``.attention`` (float32 [G, G], summing to 1; Jupyter shows it
        laid over the view).

        ``data`` is the SRC string (or an opened source) the store was made from; the first
        call checks it and the replay canary, and refuses if the views no longer match.
        """
        from ..replay import check_replay
        from ..sources import Source, open_source
        from ..views import Views

        self._rows(epoch, row)  # bounds
        name = data.name if isinstance(data, Source) else str(data)
        if name not in self._replay:
            source = data if isinstance(data, Source) else open_source(name)
            self._replay[name] = Views(source, check_replay(self, source), self.base_seed, skip_bad=True)
        view = self._replay[name].view(epoch, int(row))
        if self.kind("attention") is not None:
            view.attention = self.attention(epoch, [int(row)])[0]
        return view
