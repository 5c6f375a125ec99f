"""Code run in child processes by the integrity tests (spawned, so importable by name)."""

import tinydistill as td
from conftest import unit_data


def write_units(path, rank, world, barrier):
    st = td.open_store(path, mode="r+")
    barrier.wait()  # all writers start at once
    for e in range(st.epochs):
        for s in range(st.num_shards):
            if (e * st.num_shards + s) % world == rank:
                st.write_shard(e, s, *unit_data(st, e, s))
