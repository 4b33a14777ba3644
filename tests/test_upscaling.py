"""The Upscale tab's engine: seamless tiling, any scale, every kind of input, out-of-memory halving, release files
checked and loaded safely, and the embedded upscaler on shapes it never saw."""

import hashlib
import http.server
import re
import threading
import time
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from studio.core.errors import InvalidRequest, ModelUnavailable, OutOfMemoryBudget
from studio.core.memory import ModelManager
from studio.core.model_records import ModelKey
from studio.core.tiling import MIN_TILE, run_tiled
from studio.embedded.evaluation import psnr
from studio.models.basicsr_compat import rrdbnet_class, srvgg_class
from studio.models.upscalers import (
    UPSCALER,
    ReleaseFile,
    ReleaseFiles,
    UpscalerCatalog,
    UpscalerLoader,
    UpscalerPreset,
    load_upscalers,
    read_pth,
    upscaler_key,
)
from studio.tasks.upscaling import UpscaleLimits, UpscaleRequest, Upscaling

EMBEDDED = "embedded-rrdbnet-x4"


def random_network(kind: str, scale: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "SRVGGNetCompact":
        return srvgg_class()(num_in_ch=3, num_out_ch=3, num_feat=32, num_conv=16, upscale=scale,
                             act_type="prelu").eval()
    network = rrdbnet_class()(num_in_ch=3, num_out_ch=3, num_feat=32, num_block=3, num_grow_ch=16, scale=scale).eval()
    with torch.no_grad():  # basicsr's init scales the residual blocks by 0.1: widen the output so seams would show
        network.conv_last.weight.mul_(10)
    return network


def pasted_tiles(network, image: torch.Tensor, tile: int, scale: int) -> torch.Tensor:
    """Tiles cropped and pasted with no context or blending: what the feathered tiling must beat."""
    out = torch.zeros(1, 3, image.shape[2] * scale, image.shape[3] * scale)
    for top in range(0, image.shape[2], tile):
        for left in range(0, image.shape[3], tile):
            with torch.no_grad():
                piece = network(image[:, :, top : top + tile, left : left + tile])
            out[:, :, top * scale : top * scale + piece.shape[2], left * scale : left * scale + piece.shape[3]] = piece
    return out


@pytest.mark.parametrize(("kind", "scale", "size"), [
    ("RRDBNet", 4, (97, 131)), ("SRVGGNetCompact", 4, (97, 131)), ("RRDBNet", 2, (96, 150)),
])
@pytest.mark.parametrize("tile", [MIN_TILE, 80, 112])
def test_tiled_output_equals_untiled_within_one_level(kind, scale, size, tile):
    network = random_network(kind, scale)
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = network(image)
    tiled = run_tiled(network, image, scale, tile, "cpu", torch.float32, multiple=2 if scale == 2 else 1)
    assert tiled.shape == whole.shape
    assert whole.std() > 0.05  # the output varies: a difference would show
    assert (tiled - whole).abs().max() <= 1 / 255
    assert (pasted_tiles(network, image, tile, scale) - whole).abs().max() > 4 / 255  # pasting alone leaves seams


@pytest.fixture(scope="module")
def manager():
    return ModelManager({UPSCALER: UpscalerLoader()}, "cpu", torch.float32, device_budget=2 * 1024**3)


@pytest.fixture(scope="module")
def upscaling(manager, tmp_path_factory):
    return Upscaling(manager, load_upscalers(), ReleaseFiles(tmp_path_factory.mktemp("release"), offline=True))


def shapes_picture(size=48, mode="RGB"):
    image = Image.new("RGB", (size, size), (40, 90, 200))
    ImageDraw.Draw(image).ellipse((8, 10, 36, 38), fill=(240, 200, 30))
    return image.convert(mode)


@pytest.mark.parametrize("scale", [1, 2, 2.5, 4, 8])
def test_any_scale_from_1_to_8_gives_that_size_with_a1111s_extras_text(upscaling, scale):
    image = shapes_picture(40)
    image.info["parameters"] = "a yellow circle\nSteps: 20, Seed: 1"
    result = upscaling.upscale(image, UpscaleRequest(EMBEDDED, scale))
    assert result.image.size == (round(40 * scale), round(40 * scale))
    assert result.image.info["parameters"] == "a yellow circle\nSteps: 20, Seed: 1"  # kept, as A1111's extras does
    assert result.image.info["postprocessing"] == f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {EMBEDDED}"


def test_transparency_is_upscaled_and_kept(upscaling):
    image = shapes_picture(32, "RGBA")
    alpha = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(alpha).rectangle((0, 0, 15, 31), fill=255)  # left half opaque, right half transparent
    image.putalpha(alpha)
    result = upscaling.upscale(image, UpscaleRequest(EMBEDDED, 4)).image
    assert result.mode == "RGBA" and result.size == (128, 128)
    out = np.asarray(result.getchannel("A"))
    assert out[4:-4, 4:56].min() >= 245 and out[4:-4, 72:-4].max() <= 10  # (the corners: the model's own padding)


@pytest.mark.parametrize(("mode", "expected"), [("L", "L"), ("LA", "LA"), ("P", "RGB"), ("1", "L")])
def test_grey_palette_and_one_bit_inputs(upscaling, mode, expected):
    image = shapes_picture(32).convert(mode)
    result = upscaling.upscale(image, UpscaleRequest(EMBEDDED, 2)).image
    assert result.mode == expected and result.size == (64, 64)


def test_a_palette_image_with_transparency_comes_back_rgba(upscaling):
    image = shapes_picture(32).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = image.getpixel((0, 0))  # the background's palette entry
    result = upscaling.upscale(image, UpscaleRequest(EMBEDDED, 2)).image
    assert result.mode == "RGBA" and np.asarray(result.getchannel("A"))[4:12, 4:12].max() < 10


def test_sixteen_bit_grey_keeps_its_precision(upscaling):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    result = upscaling.upscale(Image.fromarray(ramp, mode="I;16"), UpscaleRequest("lanczos", 2)).image
    values = np.asarray(result, dtype=np.uint16)
    assert result.mode == "I;16" and result.size == (128, 64)
    assert len(np.unique(values)) > 100 and np.any(values % 257 != 0)  # not squeezed through 8 bits


@pytest.mark.parametrize(("request_", "image_size", "message"), [
    (UpscaleRequest(EMBEDDED, 9), 32, "Scale must be from 1 to 8"),
    (UpscaleRequest(EMBEDDED, 4, tile=20), 32, "A tile must be at least"),
    (UpscaleRequest("RealESRGAN_x9", 4), 32, "Unknown upscaler"),
    (UpscaleRequest(EMBEDDED, 8), 600, "the limit here"),
])
def test_bad_requests_are_refused_clearly(manager, tmp_path, request_, image_size, message):
    public = Upscaling(manager, load_upscalers(), ReleaseFiles(tmp_path, offline=True), UpscaleLimits.public())
    with pytest.raises(InvalidRequest, match=message):
        public.plan(shapes_picture(image_size), request_)


def test_an_input_over_the_public_pixel_limit_is_refused(manager, tmp_path):
    public = Upscaling(manager, load_upscalers(), ReleaseFiles(tmp_path, offline=True), UpscaleLimits.public())
    with pytest.raises(InvalidRequest, match="more than 1,048,576 pixels"):
        public.plan(Image.new("RGB", (1100, 1000)), UpscaleRequest(EMBEDDED, 2))


class RefusesLargeTiles(torch.nn.Module):
    """×4 nearest, but out of memory for any input side above `limit`, like a GPU that is too small."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape[-2:]))
        if max(x.shape[-2:]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")


class FixedLoader:
    def __init__(self, network):
        self.network = network

    def size(self, key, dtype):
        return 1000

    def load(self, key, dtype):
        return self.network


def test_out_of_memory_halves_the_tile_down_to_the_floor(tmp_path):
    network = RefusesLargeTiles(limit=100)
    manager = ModelManager({UPSCALER: FixedLoader(network)}, "cpu", torch.float32, device_budget=2 * 1024**3)
    upscaling = Upscaling(manager, load_upscalers(), ReleaseFiles(tmp_path, offline=True))
    image = shapes_picture(300)
    result = upscaling.upscale(image, UpscaleRequest(EMBEDDED, 4, tile=1024))  # a tile larger than the image
    assert result.image.size == (1200, 1200) and result.tile == 75  # 300 (the image) → 150 → 75
    assert network.calls[0] == (300, 300) and all(max(call) <= 150 for call in network.calls[1:])
    assert any("tiles of 75 px" in warning for warning in result.warnings)
    expected = image.resize((1200, 1200), Image.Resampling.NEAREST)
    assert np.abs(np.asarray(result.image, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1

    network.limit = MIN_TILE - 1  # nothing fits
    with pytest.raises(OutOfMemoryBudget, match=f"even in tiles of {MIN_TILE} px"):
        upscaling.upscale(image, UpscaleRequest(EMBEDDED, 4, tile=0))


def test_automatic_tiling_follows_the_memory_budget(tmp_path):
    small = ModelManager({UPSCALER: UpscalerLoader()}, "cpu", torch.float32, device_budget=64 * 1024**2)
    large = ModelManager({UPSCALER: UpscalerLoader()}, "cpu", torch.float32, device_budget=8 * 1024**3)
    image = shapes_picture(300)
    tiles = [Upscaling(m, load_upscalers(), ReleaseFiles(tmp_path, offline=True)).upscale(
        image, UpscaleRequest(EMBEDDED, 4)).tile for m in (small, large)]
    assert 0 < tiles[0] < 300 and tiles[1] == 0  # tiled within 64 MB, whole within 8 GB


# ----- release files -----


class Served:
    """A local HTTP server for release files (no network in tests)."""

    def __init__(self, folder):
        handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


def release_of(path, url) -> ReleaseFile:
    data = path.read_bytes()
    return ReleaseFile(path.name, url, hashlib.sha256(data).hexdigest(), len(data))


def test_a_release_file_is_fetched_once_checked_and_cached(tmp_path):
    (tmp_path / "site").mkdir()
    weights = tmp_path / "site" / "tiny_x4.pth"
    torch.save({"params_ema": random_network("SRVGGNetCompact").state_dict()}, weights)
    server = Served(tmp_path / "site")
    try:
        release = release_of(weights, f"{server.url}/tiny_x4.pth")
        files = ReleaseFiles(tmp_path / "cache", offline=False)
        progress = []
        path = files.ensure(release, lambda done, total, text: progress.append((done, total, text)))
        assert path.read_bytes() == weights.read_bytes() and progress[-1][:2] == (release.size, release.size)
        assert "Downloading tiny_x4.pth" in progress[-1][2]
        weights.unlink()  # a second ensure uses the cache, not the network
        assert files.ensure(release) == path

        wrong = replace(release, name="other.pth", url=f"{server.url}/missing.pth")
        with pytest.raises(ModelUnavailable, match="the download failed"):
            files.ensure(wrong)
        (tmp_path / "site" / "bad.pth").write_bytes(b"not the weights")
        tampered = replace(release, name="bad.pth", url=f"{server.url}/bad.pth")
        with pytest.raises(ModelUnavailable, match="not the pinned"):
            files.ensure(tampered)
        assert not (tmp_path / "cache" / "bad.pth").exists()
        oversized = replace(release, name="big.pth", size=release.size // 2)  # the server sends more than pinned
        weights.write_bytes(b"x" * release.size)
        with pytest.raises(ModelUnavailable, match="sent more than"):
            files.ensure(replace(oversized, url=f"{server.url}/tiny_x4.pth"))
        assert not list((tmp_path / "cache").glob("*.part")) and not (tmp_path / "cache" / "big.pth").exists()
    finally:
        server.close()


def test_offline_a_missing_file_names_itself_and_where_to_put_it(tmp_path):
    preset = load_upscalers().get("RealESRGAN_x4plus")
    files = ReleaseFiles(tmp_path, offline=True)
    with pytest.raises(ModelUnavailable) as error:
        files.ensure(preset.file)
    message = str(error.value)
    assert "RealESRGAN_x4plus.pth" in message and str(tmp_path) in message and preset.file.url in message
    (tmp_path / "RealESRGAN_x4plus.pth").write_bytes(b"something else")  # a wrong file put by hand is refused
    with pytest.raises(ModelUnavailable, match="is not the official RealESRGAN_x4plus.pth"):
        files.ensure(preset.file)


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_a_pth_with_pickled_code_is_refused(tmp_path):
    torch.save({"params": {"weight": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ModelUnavailable, match="carries pickled code"):
        read_pth(tmp_path / "evil.pth")


def test_a_release_pth_loads_through_the_manager_with_its_denoise_blend(tmp_path):
    """realesr-general-x4v3's denoise strength: the weights strength × general + (1 - strength) × wdn."""
    general, wdn = random_network("SRVGGNetCompact"), random_network("SRVGGNetCompact")
    with torch.no_grad():
        for parameter in wdn.parameters():
            parameter.add_(1.0)
    torch.save({"params": general.state_dict()}, tmp_path / "realesr-general-x4v3.pth")
    torch.save({"params": wdn.state_dict()}, tmp_path / "realesr-general-wdn-x4v3.pth")
    files = ReleaseFiles(tmp_path, offline=True)
    preset = replace(load_upscalers().get("realesr-general-x4v3"),
                     arch_args=(("act_type", "prelu"), ("num_conv", 16), ("num_feat", 32), ("num_in_ch", 3),
                                ("num_out_ch", 3), ("upscale", 4)))
    loader = UpscalerLoader()
    blended = loader.load(upscaler_key(preset, files, denoise_strength=0.25), torch.float32)
    plain = loader.load(upscaler_key(preset, files, denoise_strength=1.0), torch.float32)
    name = "body.0.weight"
    expected = 0.25 * general.state_dict()[name] + 0.75 * wdn.state_dict()[name]
    assert torch.allclose(blended.state_dict()[name], expected)
    assert torch.equal(plain.state_dict()[name], general.state_dict()[name])
    assert upscaler_key(preset, files, 0.25) != upscaler_key(preset, files, 0.5)  # each strength its own model


def test_every_release_preset_pins_its_official_file():
    catalog = load_upscalers()
    for name in ("RealESRGAN_x4plus", "RealESRGAN_x2plus", "RealESRGAN_x4plus_anime_6B", "realesr-general-x4v3"):
        preset = catalog.get(name)
        assert preset.file.name == f"{name}.pth" and len(preset.file.sha256) == 64
        assert preset.file.url.startswith("https://github.com/xinntao/Real-ESRGAN/releases/download/")
    assert catalog.get("RealESRGAN_x2plus").native_scale == 2
    assert catalog.get("realesr-general-x4v3").denoise_file.name == "realesr-general-wdn-x4v3.pth"
    assert catalog.get(catalog.default).folder and catalog.get("lanczos").resize == "lanczos"


def test_release_architectures_build_with_the_official_keys():
    """Each preset's architecture builds, and the key names are those the release files store."""
    from studio.models.upscalers import build_network

    catalog = load_upscalers()
    x4plus = build_network(catalog.get("RealESRGAN_x4plus").architecture)
    general = build_network(catalog.get("realesr-general-x4v3").architecture)
    assert "conv_first.weight" in x4plus.state_dict() and len(x4plus.body) == 23
    assert "body.0.weight" in general.state_dict()
    for network, name in ((x4plus, "RealESRGAN_x4plus"), (general, "realesr-general-x4v3")):
        fp32_bytes = 4 * sum(parameter.numel() for parameter in network.parameters())
        assert abs(fp32_bytes - catalog.get(name).file.size) < 0.01 * fp32_bytes  # the release file's own size


# ----- the embedded upscaler on shapes it never saw -----


def unseen_shapes(seed: int, side: int = 256) -> Image.Image:
    """Hexagons, thin lines and ellipse outlines in colours off the training palette: nothing the embedded family's
    scenes draw."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy, r = rng.uniform(40, side - 40, 2).tolist() + [rng.uniform(15, 40)]
        kind = rng.integers(3)
        if kind == 0:
            angles = np.linspace(0, 2 * np.pi, 7)[:-1] + rng.uniform(0, 1)
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=colour)
        elif kind == 1:
            draw.line([tuple(rng.uniform(0, side, 2)), tuple(rng.uniform(0, side, 2))], fill=colour, width=3)
        else:
            draw.ellipse((cx - r, cy - r * 0.6, cx + r, cy + r * 0.6), outline=colour, width=4)
    return image


def test_the_embedded_upscaler_beats_bicubic_on_shapes_it_never_saw(upscaling):
    """It did not before it was trained on crops in random colours too: it pulled every colour towards its
    palette (mean 29.00 dB against bicubic's 29.00, 2.5 dB worse on one image); now 29.66 dB, ahead on all six."""
    ours, bicubic = [], []
    for seed in range(6):
        high = unseen_shapes(seed)
        low = high.resize((64, 64), Image.Resampling.BICUBIC)
        ours.append(psnr(np.asarray(upscaling.upscale(low, UpscaleRequest(EMBEDDED, 4)).image), np.asarray(high)))
        bicubic.append(psnr(np.asarray(low.resize(high.size, Image.Resampling.BICUBIC)), np.asarray(high)))
    wins = sum(o > b for o, b in zip(ours, bicubic))
    assert np.mean(ours) > np.mean(bicubic) and wins >= 5, (ours, bicubic)


def test_the_embedded_preset_is_a_folder_key_held_by_the_manager(manager, upscaling):
    key = upscaler_key(load_upscalers().get(EMBEDDED))
    assert key == ModelKey(UPSCALER, str(load_upscalers().get(EMBEDDED).folder))
    upscaling.upscale(shapes_picture(32), UpscaleRequest(EMBEDDED, 2))
    assert manager.is_loaded(key)


def x2_folder(tmp_path) -> UpscalerPreset:
    """A random-weight RRDBNet ×2 (pixel unshuffle inside) as a folder preset, like the embedded one."""
    import json

    from safetensors.torch import save_file

    folder = tmp_path / "x2"
    folder.mkdir()
    network = random_network("RRDBNet", scale=2)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, folder / "weights.safetensors")
    (folder / "config.json").write_text(json.dumps({"arch": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3,
                                                    "num_feat": 32, "num_block": 3, "num_grow_ch": 16, "scale": 2}))
    return UpscalerPreset("x2", "Random ×2", folder=str(folder))


def test_a_x2_model_takes_odd_and_one_pixel_images_and_tiles_them_seamlessly(manager, tmp_path):
    preset = x2_folder(tmp_path)
    upscaling = Upscaling(manager, UpscalerCatalog({"x2": preset}, "x2"), ReleaseFiles(tmp_path, offline=True))
    assert upscaling.upscale(Image.new("RGB", (1, 1), (200, 30, 30)), UpscaleRequest("x2", 2)).image.size == (2, 2)
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (97, 151, 3), dtype=np.uint8))
    whole = upscaling.upscale(image, UpscaleRequest("x2", 2, tile=0)).image
    tiled = upscaling.upscale(image, UpscaleRequest("x2", 2, tile=67))  # odd: rounded down to what ×2 takes
    assert whole.size == tiled.image.size == (302, 194) and tiled.tile == 66
    assert np.abs(np.asarray(whole, dtype=int) - np.asarray(tiled.image, dtype=int)).max() <= 1


def test_progress_counts_passes_and_tiles_and_stop_ends_the_job(upscaling):
    reports = []
    image = shapes_picture(150)
    upscaling.upscale(image, UpscaleRequest(EMBEDDED, 8, tile=64), lambda done, total, text: reports.append(
        (done, total, text)))
    assert [done for done, _, _ in reports] == sorted(done for done, _, _ in reports)
    assert reports[-1][0] == reports[-1][1]
    assert re.fullmatch(r"Pass 1/1, tile (\d+)/\1", reports[-1][2]), reports[-1]  # ×8 on a ×4 model: one pass
    cancel = threading.Event()

    def stop_after_two(done, total, text):
        if ", tile 2/" in text:
            cancel.set()

    result = upscaling.upscale(image, UpscaleRequest(EMBEDDED, 4, tile=64), stop_after_two, cancel)
    assert result.interrupted and result.image is None


def test_the_limit_counts_the_pixels_a_pass_goes_through_not_only_the_result(manager, tmp_path):
    limited = Upscaling(manager, load_upscalers(), ReleaseFiles(tmp_path, offline=True),
                        UpscaleLimits(max_input_pixels=10**6, max_output_pixels=4 * 10**6))
    image = Image.new("RGB", (1000, 1000))
    with pytest.raises(InvalidRequest, match="would pass through 16,000,000 pixels"):  # ×1: a ×4 pass, then down
        limited.plan(image, UpscaleRequest(EMBEDDED, 1))
    assert limited.plan(image, UpscaleRequest("lanczos", 2)).size == (2000, 2000)  # a resize to the limit: allowed
    assert limited.plan(image.resize((500, 500)), UpscaleRequest(EMBEDDED, 4)).passes == 1


def test_tiling_a_realesrgan_x4plus_size_network_stays_within_one_level():
    """The 23-block network of RealESRGAN_x4plus (random weights), whose receptive field is the widest here."""
    torch.manual_seed(0)
    network = rrdbnet_class()(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4).eval()
    with torch.no_grad():
        network.conv_last.weight.mul_(10)
    image = torch.rand(1, 3, 90, 100, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = network(image)
    tiled = run_tiled(network, image, 4, MIN_TILE, "cpu", torch.float32)
    assert whole.std() > 0.05 and (tiled - whole).abs().max() <= 1 / 255


class SlowNearest(torch.nn.Module):
    """×4 nearest, taking `seconds` per call, recording when each call ran."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds, self.times = seconds, []

    def forward(self, x):
        time.sleep(self.seconds)
        self.times.append(time.monotonic())
        return torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")


def test_another_job_takes_its_turn_between_the_tiles_of_a_large_upscale(tmp_path):
    """A long upscale does not hold the device from start to end: a quick job waiting for its turn gets it at the
    next tile, as it would between the images of a batch."""
    network = SlowNearest(0.1)
    manager = ModelManager({UPSCALER: FixedLoader(network)}, "cpu", torch.float32, device_budget=2 * 1024**3)
    upscaling = Upscaling(manager, load_upscalers(), ReleaseFiles(tmp_path, offline=True))
    started = threading.Event()
    worker = threading.Thread(target=lambda: upscaling.upscale(
        shapes_picture(150), UpscaleRequest(EMBEDDED, 4, tile=64), lambda *progress: started.set()))
    worker.start()
    started.wait(10)  # the first tile is done
    with manager.turn():  # a quick job's image
        quick = time.monotonic()
    worker.join()
    assert len(network.times) > 4 and quick < network.times[-3], (quick, network.times)


def test_a_tiled_upscale_shows_its_tiles_filling_in_and_the_result_is_the_same_without(upscaling, monkeypatch):
    """Each preview (but the last tile's: the result follows) is the output so far over the input enlarged, at
    most PREVIEW_SIDE a side; later ones have more of the result in them; the result is the same bit for bit."""
    import studio.tasks.upscaling as upscaling_module
    from studio.core.jobs import PREVIEW_SIDE, LocalJob

    monkeypatch.setattr(upscaling_module, "PREVIEW_INTERVAL_S", 0.0)
    image = shapes_picture(150)
    request = UpscaleRequest(EMBEDDED, 4, tile=64)
    shown: list[Image.Image] = []
    texts: list[str] = []
    with upscaling.model_files(upscaling.plan(image, request)) as plan:
        watched = upscaling.run(plan, LocalJob(lambda done, total, text: texts.append(text),
                                               on_preview=lambda preview, part: shown.append(preview)))
        plain = upscaling.run(plan, LocalJob())
    assert np.array_equal(np.asarray(watched.image), np.asarray(plain.image))
    tiles = int(re.fullmatch(r"Pass 1/1, tile (\d+)/\1", texts[-1]).group(1))
    side = 600 // 2  # the 600 px result seen from every second pixel (at most PREVIEW_SIDE)
    assert side <= PREVIEW_SIDE and len(shown) == tiles - 1 > 1 and {preview.size for preview in shown} == {(side, side)}
    result = np.asarray(plain.image.resize((side, side), Image.Resampling.NEAREST), dtype=np.float64)
    distance = [np.abs(np.asarray(preview, dtype=np.float64) - result).mean() for preview in shown]
    assert distance == sorted(distance, reverse=True) and distance[-1] < distance[0] / 2, distance
    # the first tile (top left) is already the result's
    assert np.abs(np.asarray(shown[0], dtype=np.float64)[:60, :60] - result[:60, :60]).mean() < 3
