"""A process extracting tar-shard features into a shared cache, for tests/test_sources.py: a
cheap deterministic encoder (mean colour through a fixed projection) that sleeps per batch, so
that two such processes overlap. Usage: python wds_workers.py CACHE RESULT.json GO_FILE SLEEP_S
SHARD...; it starts once GO_FILE exists and writes {"encoded": n, "ok": k} to RESULT.json."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from inmap_ext.clip import ClipModel  # noqa: E402
from inmap_ext.shards import ShardSet, shard_features  # noqa: E402

DIM = 8


class SlowEncoder(torch.nn.Module):
    def __init__(self, sleep_s: float):
        super().__init__()
        self.sleep_s = sleep_s
        self.proj = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))

    def encode_image(self, x, normalize=False):
        time.sleep(self.sleep_s)
        f = x.mean(dim=(2, 3)) @ self.proj + 0.1
        return torch.nn.functional.normalize(f, dim=1) if normalize else f


class Preprocess:
    def __call__(self, im):
        return torch.from_numpy(__import__("numpy").asarray(im.resize((4, 4)), dtype="float32")
                                ).permute(2, 0, 1)

    def __repr__(self):        # part of the cache key: the same in every process
        return "Preprocess(4x4)"


def fake_clip(sleep_s: float) -> ClipModel:
    return ClipModel(SlowEncoder(sleep_s), Preprocess(), None, "fake", None, "fake-weights",
                     torch.device("cpu"), "fp32")


if __name__ == "__main__":
    cache, result, go, sleep_s, *shards = sys.argv[1:]
    clip = fake_clip(float(sleep_s))
    while not os.path.exists(go):
        time.sleep(0.01)
    feats, ok, c = shard_features(clip, ShardSet(shards, "test"), cache_dir=cache, batch_size=4,
                                  workers=0, progress=False, wait_s=0.05)
    with open(result, "w") as f:
        json.dump({"encoded": c.encoded, "ok": int(ok.sum()), "n": len(ok)}, f)
