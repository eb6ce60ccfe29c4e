"""Stand-in for lerobot's dataset module, for openpi's tests on fake data (tests/openpi_support only).

openpi imports `lerobot.common.datasets.lerobot_dataset` when its data loader is imported; the fake-data configs the
tests train never use it. Anything that does use it fails loudly here.
"""

import os
import pathlib

HF_LEROBOT_HOME = pathlib.Path(os.environ.get("HF_LEROBOT_HOME", pathlib.Path.home() / ".cache/huggingface/lerobot"))


class _StandIn:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"{type(self).__name__} is the openpi-merge-plugin tests' lerobot stand-in; install the real lerobot to "
            "train on a LeRobot dataset"
        )


class LeRobotDatasetMetadata(_StandIn):
    pass


class LeRobotDataset(_StandIn):
    pass
