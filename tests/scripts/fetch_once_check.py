"""One rank of the fetch-once test (tests/test_weights.py starts two): the real collective (gloo
all-reduce) and a stand-in hub that writes the 'weights' into a per-node cache folder and logs each
call, so the test can count downloads per node.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/scripts/fetch_once_check.py WORKDIR
"""

import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

from vlm_dist.config import load_config
from vlm_dist.model.vision import PretrainedWeightsError
from vlm_dist.train.weights import fetch_once


class StandInHub:
    def __init__(self, cache: Path, log: Path, rank: int, fail: bool = False):
        self.cache, self.log, self.rank, self.fail = cache, log, rank, fail

    def _note(self, what: str) -> None:
        with open(self.log, "a") as f:  # O_APPEND: lines of both ranks never interleave
            f.write(json.dumps({"rank": self.rank, "call": what, "t": time.time()}) + "\n")

    def download(self, cfg) -> str:
        self._note("download")
        if self.fail:
            raise PretrainedWeightsError("stand-in hub: unreachable")
        time.sleep(1.0)  # a slow download: the other rank must still be waiting when it ends
        path = self.cache / f"{cfg.model_name}-{cfg.pretrained}.bin"
        self.cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")
        self._note("downloaded")
        return str(path)

    def cached(self, cfg) -> str | None:
        path = self.cache / f"{cfg.model_name}-{cfg.pretrained}.bin"
        self._note("cached-hit" if path.is_file() else "cached-miss")
        return str(path) if path.is_file() else None


def main(work: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model_cfg = load_config("base").model
    results = {}
    # (scenario, this rank's local rank, its node's cache folder, hub fails)
    for name, local_rank, node, fail in [("one_node", rank, 0, False), ("two_nodes", 0, rank, False),
                                         ("failing", rank, 0, True)]:
        hub = StandInHub(work / name / f"cache-node{node}", work / name / "calls.jsonl", rank, fail)
        (work / name).mkdir(parents=True, exist_ok=True)
        dist.barrier()
        try:
            out = fetch_once(model_cfg, local_rank=local_rank, hub=hub)
            results[name] = {"pretrained": out.vision.pretrained, "read": Path(out.vision.pretrained).read_bytes().decode()}
        except PretrainedWeightsError as err:
            results[name] = {"error": str(err), "report": err.report}
    print("RESULT " + json.dumps({"rank": rank, **results}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
