"""`Held` against real Ray: pickled the way Serve's gRPC transport pickles a call (outside
Ray's task path), it is fetched in another process while its owner keeps it, and leaves no pin
behind in the process that pickled it, where a plain `ObjectRef` is pinned for good; a
`Keeper` lets go when released or when the hold time passes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.kv.held import Held, Keeper

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def owner(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Owner:
        """A replica that puts a value and hands it out in a pickled call result."""

        def __init__(self):
            self.held = None

        def put(self, plain: bool) -> tuple[bytes, bytes]:
            from ray import cloudpickle

            self.held = Held.put(np.arange(1000))
            wire = self.held.ref if plain else self.held
            return self.held.key, cloudpickle.dumps(wire)

        def drop(self) -> None:
            self.held = None

        def holds(self, key: bytes) -> bool:
            counts = ray._private.worker.global_worker.core_worker.get_all_reference_counts()
            return any(getattr(ref, "binary", lambda: ref)() in (key, key.hex().encode())
                       for ref in counts)

    actor = Owner.remote()
    yield actor
    ray.kill(actor)


def test_held_is_fetched_elsewhere_and_freed_once_its_owner_drops_it(owner, ray_session):
    from ray import cloudpickle

    ray = ray_session
    key, wire = ray.get(owner.put.remote(plain=False))
    held = cloudpickle.loads(wire)
    assert asyncio.run(held.fetch()).sum() == np.arange(1000).sum()
    del held
    ray.get(owner.drop.remote())
    assert not ray.get(owner.holds.remote(key))


def test_a_plain_ref_pickled_the_same_way_is_pinned_for_good(owner, ray_session):
    ray = ray_session
    key, _ = ray.get(owner.put.remote(plain=True))
    ray.get(owner.drop.remote())
    assert ray.get(owner.holds.remote(key))  # why `Held` exists


def test_keeper_lets_go_on_release_or_when_the_hold_passes(ray_session):
    async def run():
        keeper = Keeper()
        released = keeper.keep(Held.put(1), hold_s=60)
        keeper.keep(Held.put(2), hold_s=0.05)
        assert len(keeper) == 2
        keeper.release(released)
        keeper.release(released)  # twice is harmless
        assert len(keeper) == 1
        await asyncio.sleep(0.2)
        return len(keeper)

    assert asyncio.run(run()) == 0


def test_keeper_lets_go_of_a_requests_values_together(ray_session):
    async def run():
        keeper = Keeper()
        mine = [keeper.keep(Held.put(i), hold_s=60, group="r1", nbytes=100) for i in range(3)]
        keeper.keep(Held.put(9), hold_s=60, group="r2", nbytes=7)
        assert keeper.nbytes == 307
        keeper.release(mine[0])  # one already gone counts no more
        assert keeper.release_group("r1") == 2 and len(keeper) == 1
        assert keeper.nbytes == 7
        assert keeper.release_group("r1") == 0  # twice is harmless
        keeper.keep(Held.put(8), hold_s=0.05, group="r3")
        await asyncio.sleep(0.2)  # the hold passed: its group is gone with it
        return len(keeper), keeper.release_group("r3"), keeper.release_group("r2")

    assert asyncio.run(run()) == (1, 0, 1)
