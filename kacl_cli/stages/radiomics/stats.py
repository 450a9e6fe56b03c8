"""Training-split z-scoring statistics of radiomic features (``radiomics_stats``).

Its own module because two writers need it: the stage (after computing a round) and the
merge of radiomics parts (over the whole merged workspace, never per shard).
"""

from __future__ import annotations

import numpy as np

from kacl_cli.catalog import insert_columns
from kacl_cli.workspace import Workspace

TRAIN_SPLIT = "train"


def compute_stats(ws: Workspace, round_: int, shash: str, n_features: int) -> int:
    """Per-feature mean/std over finite values of the TRAINING split's positive ROIs.

    Only training images: validation and test features are z-scored with statistics they
    did not contribute to. std 0 (a constant feature) becomes 1 so z-scoring never divides by
    zero. Returns the number of training rows used (0 = no statistics written). Rows are
    summed in store-row order: without an order the join's, which follows the tables'
    physical layout, set the last bits of the sums (a merged or re-run catalog could differ).
    """
    data = ws.catalog.query(
        "SELECT r.features FROM radiomics r JOIN rois o USING (round, image_id, finding) "
        "JOIN images i USING (image_id) WHERE r.round = ? AND r.settings_hash = ? "
        "AND o.is_positive AND i.split = ? AND r.features IS NOT NULL "
        "ORDER BY i.row, r.finding",
        [round_, shash, TRAIN_SPLIT],
    )
    with ws.catalog.connect() as con:
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM radiomics_stats WHERE round = ? AND settings_hash = ?",
                    [round_, shash])
        if data:
            x = np.asarray([d[0] for d in data], dtype=np.float64).reshape(len(data), n_features)
            mean, std, n = finite_stats(x)
            insert_columns(con, "radiomics_stats", {  # numpy columns: scanned, not bound
                "round": np.full(n_features, round_, dtype=np.int64),
                "settings_hash": np.full(n_features, shash, dtype=object),
                "feature_index": np.arange(n_features, dtype=np.int64), "mean": mean,
                "std": std, "n": n.astype(np.int64),
            })
        con.execute("COMMIT")
    return len(data)


def finite_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column mean/std over finite entries; a column with no spread (or no data) gets std 1."""
    finite = np.isfinite(x)
    n = finite.sum(axis=0)
    xs = np.where(finite, x, 0.0)
    mean = np.divide(xs.sum(axis=0), n, out=np.zeros(x.shape[1]), where=n > 0)
    var = np.divide((np.where(finite, x - mean, 0.0) ** 2).sum(axis=0), n,
                    out=np.zeros(x.shape[1]), where=n > 0)
    std = np.sqrt(var)
    std = np.where((std > 0) & np.isfinite(std), std, 1.0)
    return mean, std, n
