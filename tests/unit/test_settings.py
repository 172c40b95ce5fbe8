"""The settings root: the embedded profile loads, unknown keys and bad values name the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster.settings import SettingsError, load_settings, parse_settings

NO_AUTH = {"auth": {"enabled": False}}
ROOT = Path(__file__).resolve().parents[2]


def test_embedded_profile_runs_two_pools_on_cpu():
    settings = load_settings()
    assert settings.profile == "local"
    assert settings.engine.kind == "reference" and settings.model.source == "standin"
    assert {p.effort for p in settings.pools.values()} == {"none", "high"}
    assert all(p.prefill.num_gpus == 0 and p.decode.num_gpus == 0
               for p in settings.pools.values())


@pytest.mark.parametrize("data, field", [
    ({"engine": {"kind": "reference", "turbo": True}}, "engine.turbo"),
    ({"modle": {}}, "modle"),
    ({"pools": {"fast": {"effort": "none", "prefill": {"replicas": -1}}}}, "pools.fast.prefill.replicas"),
    # a role without a replica serves nothing: its pool's requests wait out their deadlines
    ({"pools": {"fast": {"effort": "none", "decode": {"replicas": 0}}}}, "pools.fast.decode.replicas"),
    ({"engine": {"kind": "vllm"}}, "engine.kind"),
])
def test_bad_settings_name_the_field(data, field):
    with pytest.raises(SettingsError) as err:
        parse_settings(data | NO_AUTH)
    assert err.value.field == field
    assert field in str(err.value)


def test_auth_must_be_configured_or_turned_off_explicitly():
    with pytest.raises(SettingsError, match="auth.enabled: false") as err:
        parse_settings({})
    assert err.value.field == "auth"
    with pytest.raises(SettingsError, match="auth.keys_file is required"):
        parse_settings({"auth": {"enabled": True}})
    assert not parse_settings(NO_AUTH).auth.enabled


def test_the_edges_body_budget_must_hold_one_largest_body():
    with pytest.raises(SettingsError, match="edge_body_budget_bytes") as err:
        parse_settings({"limits": {"max_body_bytes": 2000, "edge_body_budget_bytes": 1000}}
                       | NO_AUTH)
    assert err.value.field == "limits"
    ok = parse_settings({"limits": {"max_body_bytes": 1000, "edge_body_budget_bytes": 1000}}
                        | NO_AUTH)
    assert ok.limits.edge_body_budget_bytes == 1000


def test_an_image_at_the_image_limit_fits_in_a_string_the_body_check_allows():
    """The body check runs before the image limit: an image limit whose data: URL is over
    `limits.max_string_bytes` is refused at load (images between the two were refused as an
    over-long string); at the smallest string limit accepted, the body check takes the URL
    of an image of exactly that size."""
    import base64
    import json

    from services.errors import PayloadTooLarge
    from services.guard.body import ShapeCheck

    image = 300_000
    with pytest.raises(SettingsError, match="multimodal.images.max_bytes") as err:
        parse_settings({"multimodal": {"images": {"max_bytes": image}},
                        "limits": {"max_string_bytes": image}} | NO_AUTH)
    floor = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    with pytest.raises(SettingsError):
        parse_settings({"multimodal": {"images": {"max_bytes": image}},
                        "limits": {"max_string_bytes": floor - 1}} | NO_AUTH)
    settings = parse_settings({"multimodal": {"images": {"max_bytes": image}},
                               "limits": {"max_string_bytes": floor}} | NO_AUTH)
    url = "data:image/png;base64," + base64.b64encode(bytes(image)).decode()
    body = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]}).encode()
    check = ShapeCheck(settings.limits)
    check.feed(body)
    check.finish()
    over = ShapeCheck(settings.limits)  # the bound is the string limit's, not a looser one
    with pytest.raises(PayloadTooLarge):
        over.feed(json.dumps({"s": "x" * (floor + 1)}).encode())
        over.finish()


def test_sglang_settings_its_replicas_would_refuse_at_start_are_refused_at_load():
    """What an SGLang replica would refuse only after taking its GPUs (`small4 up` and the
    chart deploy it): the stand-in model, arguments the stack sets itself."""
    import yaml

    data = yaml.safe_load((ROOT / "cluster" / "profiles" / "h200x16.yaml").read_text())
    parse_settings(data)  # as it is
    with pytest.raises(SettingsError, match="serves a checkpoint"):
        parse_settings(data | {"model": data["model"] | {"source": "standin", "path": None}})
    sglang = data["engine"].get("sglang", {})
    with pytest.raises(SettingsError, match="may not set tp_size"):
        parse_settings(data | {"engine": data["engine"] | {
            "sglang": sglang | {"server_args": {"tp_size": 4}}}})
    loose = sglang | {"server_args": {"schedule_policy": "lpm"}}
    assert parse_settings(data | {"engine": data["engine"] | {"sglang": loose}})


def test_the_default_body_holds_the_most_images_of_the_largest_size_base64():
    limits = parse_settings(NO_AUTH).limits
    images = parse_settings(NO_AUTH).multimodal.images
    encoded = -(-images.max_bytes // 3) * 4
    assert images.max_images * encoded < limits.max_body_bytes
    assert encoded < limits.max_string_bytes


def test_image_formats_are_pillows_names_whatever_their_case():
    assert parse_settings({"multimodal": {"images": {"formats": ["png", "jpg"]}}}
                          | NO_AUTH).multimodal.images.formats == ("PNG", "JPEG")
    with pytest.raises(SettingsError, match="not one Pillow reads"):
        parse_settings({"multimodal": {"images": {"formats": ["PNG", "HEIC2"]}}} | NO_AUTH)


def test_checkpoint_source_needs_a_path():
    with pytest.raises(SettingsError, match="model.path is required"):
        parse_settings({"model": {"source": "checkpoint"}} | NO_AUTH)


def test_every_mapped_effort_needs_a_pool():
    with pytest.raises(SettingsError, match="no pool serves effort"):
        parse_settings({"pools": {"fast": {"effort": "none"}}} | NO_AUTH)


def test_profile_file_round_trip(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("profile: tiny\nstream: {interval_tokens: 4}\nauth: {enabled: false}\n")
    settings = load_settings(path)
    assert settings.profile == "tiny" and settings.stream.interval_tokens == 4
    assert settings.worker("fast").stream.interval_tokens == 4
