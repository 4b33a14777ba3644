import numpy as np
import pytest
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, LCMScheduler

from studio.a1111.schedulers import SCHEDULERS, a1111_sampler_fields, make_scheduler, scheduler_from_a1111
from studio.core.errors import InvalidRequest

# Stable Diffusion 1.5's own scheduler config (PNDM, "leading" with offset 1), which every sampler starts from
BASE = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "clip_sample": False,
}
STEPS = 20


def model_sigmas():
    """The training noise levels of the base config, as k-diffusion's CompVisDenoiser computes them."""
    betas = np.linspace(BASE["beta_start"] ** 0.5, BASE["beta_end"] ** 0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def schedule(name):
    scheduler = make_scheduler(name, BASE)
    scheduler.set_timesteps(STEPS)
    return scheduler


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_name_builds_its_diffusers_scheduler(name):
    scheduler = make_scheduler(name, BASE)
    entry = SCHEDULERS[name]
    assert type(scheduler) is entry.scheduler_class
    for key, value in entry.overrides.items():
        assert scheduler.config[key] == value


def test_karras_schedule_is_k_diffusions():
    # k-diffusion's get_sigmas_karras(n, sigma_min, sigma_max, rho=7), A1111's "Karras"
    sigmas = model_sigmas()
    ramp = np.linspace(0, 1, STEPS)
    low, high = sigmas[0] ** (1 / 7), sigmas[-1] ** (1 / 7)
    expected = (high + ramp * (low - high)) ** 7
    for name in ("DPM++ 2M Karras", "LMS Karras", "DPM++ 2M SDE Karras"):
        got = np.asarray(schedule(name).sigmas[:STEPS], dtype=np.float64)
        np.testing.assert_allclose(got, expected, rtol=2e-3, err_msg=name)


def test_exponential_schedule_is_k_diffusions():
    sigmas = model_sigmas()
    expected = np.exp(np.linspace(np.log(sigmas[-1]), np.log(sigmas[0]), STEPS))
    got = np.asarray(schedule("DPM++ 2M SDE Exponential").sigmas[:STEPS], dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=2e-3)


@pytest.mark.parametrize("name", ["Euler", "Euler a", "LMS"])
def test_uniform_schedule_is_k_diffusions(name):
    # k-diffusion's get_sigmas: t = linspace(999, 0, n); diffusers' "leading" (the model's config) starts at 951
    timesteps = np.asarray(schedule(name).timesteps, dtype=np.float64)
    np.testing.assert_allclose(timesteps, np.linspace(999, 0, STEPS), atol=0.5)


def test_dpm_solvers_start_at_the_highest_noise_too():
    # diffusers' multistep solvers space n + 1 points and drop t=0 (their last step goes to sigma 0)
    for name in ("DPM++ 2M", "DPM++ 2M SDE"):
        assert float(schedule(name).timesteps[0]) == pytest.approx(999, abs=0.5), name


def test_ddim_never_clips_latents_whatever_the_model_config_says():
    scheduler = make_scheduler("DDIM", DDIMScheduler().config)  # diffusers' default: clip_sample=True
    assert scheduler.config.clip_sample is False and scheduler.config.set_alpha_to_one is False


def test_overrides_do_not_stick_and_the_presets_win():
    config = dict(BASE)
    assert make_scheduler("Euler a", config, {"timestep_spacing": "trailing"}).config.timestep_spacing == "trailing"
    assert make_scheduler("DPM++ 2M Karras", config).config.use_karras_sigmas is True
    assert config == BASE
    assert type(make_scheduler("Euler a", config)) is EulerAncestralDiscreteScheduler
    assert type(make_scheduler("LCM", config)) is LCMScheduler


def test_the_sde_sampler_draws_its_noise_from_the_images_seed():
    assert make_scheduler("DPM++ SDE Karras", BASE, seed=42).config.noise_sampler_seed == 42
    assert make_scheduler("Euler", BASE, seed=42).config.get("noise_sampler_seed") is None


def test_unknown_scheduler_is_refused():
    with pytest.raises(InvalidRequest, match="Unknown scheduler 'DPM adaptive'"):
        make_scheduler("DPM adaptive", BASE)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_a1111_fields_round_trip(name):
    fields = a1111_sampler_fields(name)
    assert scheduler_from_a1111(fields["Sampler"], fields["Schedule type"]) == name


@pytest.mark.parametrize(("sampler", "schedule", "expected"), [
    ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),
    ("DPM++ 2M", "Automatic", "DPM++ 2M Karras"),  # A1111 1.9's default schedule for it
    ("DPM++ 2M SDE", "Automatic", "DPM++ 2M SDE Exponential"),
    ("DPM++ SDE", "Automatic", "DPM++ SDE Karras"),
    ("DPM2 a", "Automatic", "DPM2 a Karras"),
    ("Euler a", "Automatic", "Euler a"),
    ("Heun", "Uniform", "Heun"),
    ("LMS", "Karras", "LMS Karras"),
    ("DDIM", "Automatic", "DDIM"),
    ("Euler", "Karras", None),  # we have no Euler Karras
    ("DPM++ 2M", "Align Your Steps", None),
    ("DPM adaptive", "Automatic", None),
])
def test_a1111_19_fields(sampler, schedule, expected):
    assert scheduler_from_a1111(sampler, schedule) == expected


def test_a1111_before_19_combined_names():
    assert scheduler_from_a1111("DPM++ 2M Karras") == "DPM++ 2M Karras"
    assert scheduler_from_a1111("DPM++ 2M") == "DPM++ 2M"  # then it meant the uniform schedule
    assert scheduler_from_a1111("DPM2 a Karras") == "DPM2 a Karras"
    assert scheduler_from_a1111("DPM fast") is None


def test_a_models_own_schedule_settings_do_not_leak_into_the_chosen_sampler():
    """A fine-tune's config with Karras (or exponential) sigmas on, or a Heun DPM solver, must not change what
    "Euler" or "DPM++ 2M Karras" mean (nor make them refuse to build)."""
    karras_config = {**BASE, "use_karras_sigmas": True}
    exponential_config = {**BASE, "use_exponential_sigmas": True, "solver_type": "heun", "final_sigmas_type": "sigma_min"}
    assert make_scheduler("Euler", karras_config).config.use_karras_sigmas is False
    built = make_scheduler("DPM++ 2M Karras", exponential_config)
    assert built.config.use_karras_sigmas and not built.config.use_exponential_sigmas
    assert (built.config.solver_type, built.config.final_sigmas_type) == ("midpoint", "zero")
