import pytest
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, LCMScheduler

from studio.errors import InvalidRequest
from studio.schedulers import SCHEDULERS, a1111_sampler_fields, make_scheduler, scheduler_from_a1111

BASE = DPMSolverMultistepScheduler().config


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_name_builds_its_diffusers_scheduler(name):
    scheduler = make_scheduler(name, BASE)
    expected_class, overrides = SCHEDULERS[name]
    assert type(scheduler) is expected_class
    for key, value in overrides.items():
        assert scheduler.config[key] == value


def test_karras_is_on_only_for_the_karras_variant():
    assert make_scheduler("DPM++ 2M Karras", BASE).config.use_karras_sigmas is True
    assert make_scheduler("DPM++ 2M", BASE).config.use_karras_sigmas is False


def test_overrides_do_not_stick_to_the_model_config():
    config = dict(BASE)
    make_scheduler("DPM++ 2M Karras", config, {"timestep_spacing": "trailing"})
    assert config == dict(BASE)
    assert make_scheduler("Euler a", config, {"timestep_spacing": "trailing"}).config.timestep_spacing == "trailing"
    assert type(make_scheduler("Euler a", config)) is EulerAncestralDiscreteScheduler
    assert type(make_scheduler("LCM", config)) is LCMScheduler


def test_unknown_scheduler_is_refused():
    with pytest.raises(InvalidRequest, match="Unknown scheduler 'Heun'"):
        make_scheduler("Heun", BASE)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_a1111_sampler_names_round_trip(name):
    fields = a1111_sampler_fields(name)
    assert scheduler_from_a1111(fields["Sampler"], fields.get("Schedule type")) == name


def test_old_a1111_sampler_spelling_is_understood():
    assert scheduler_from_a1111("DPM++ 2M Karras") == "DPM++ 2M Karras"
    assert scheduler_from_a1111("DPM++ SDE", "Karras") is None
