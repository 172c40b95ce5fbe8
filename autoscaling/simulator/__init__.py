"""A discrete-event simulator of the 16 x H200 cluster (8 TP2 engines) running the same
autoscaling policies as the Serve adapter, against a static split and Ray Serve's default."""

from autoscaling.simulator.scenario import CONTROLLERS, SimSettings, capacity_rps, run

__all__ = ["CONTROLLERS", "SimSettings", "capacity_rps", "run"]
