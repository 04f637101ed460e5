"""`patchmix` against the independent multi-pass reference, bit for bit, on both backends."""
import os
import subprocess
import sys

import pytest
import torch

from kernels.patchmix import group_of_positions, patchmix
from kernels.reference import patchmix_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["torch", "triton"]
# (B, C, H, W, patch): batch sizes 1..9, non-square images, T not divisible by every m.
SHAPES = [
    (1, 3, 8, 8, 2),
    (2, 3, 12, 8, 4),
    (3, 1, 6, 10, 2),
    (4, 3, 32, 32, 4),
    (5, 2, 9, 15, 3),
    (6, 3, 16, 48, 16),
    (7, 3, 10, 14, 2),
    (8, 3, 32, 32, 2),
    (9, 4, 20, 5, 5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_multipass_reference(shape, dtype, backend):
    batch, channels, height, width, patch = shape
    num_patches = (height // patch) * (width // patch)
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    images = torch.randn(batch, channels, height, width, generator=gen).to(dtype)
    for num_mix in range(1, min(4, num_patches) + 1):
        perm = torch.randperm(num_patches, generator=gen)
        mixed, group = patchmix(images, patch, num_mix, perm=perm, backend=backend)
        expected = patchmix_reference(images, patch, num_mix, perm)
        assert mixed.dtype == dtype and mixed.shape == images.shape
        assert torch.equal(mixed, expected), f"m={num_mix}"
        assert group.shape == (num_patches,) and not group.is_floating_point()


def test_group_follows_the_recipe_definition():
    # T = 7, m = 2: S = 3, perm[0:3] -> group 0, perm[3:6] -> group 1, perm[6] (remainder) -> group 0.
    perm = torch.tensor([4, 0, 6, 2, 5, 1, 3])
    assert group_of_positions(perm, 2).tolist() == [0, 1, 1, 0, 0, 1, 0]
    # T = 7, m = 3: S = 2: {4,0} -> 0, {6,2} -> 1, {5,1} -> 2, remainder {3} -> 0.
    assert group_of_positions(perm, 3).tolist() == [0, 2, 1, 0, 0, 2, 1]


def test_every_patch_comes_from_the_image_its_group_names():
    images = torch.arange(5 * 1 * 6 * 4, dtype=torch.float32).reshape(5, 1, 6, 4)
    mixed, group = patchmix(images, 2, 3, generator=torch.Generator().manual_seed(0))
    patches = lambda x: x.reshape(5, 1, 3, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(5, 6, -1)
    out, src = patches(mixed), patches(images)
    for g in range(5):
        for t in range(6):
            assert torch.equal(out[g, t], src[(g + int(group[t])) % 5, t])
    assert sorted(torch.bincount(group).tolist()) == [2, 2, 2]


def test_backends_are_bit_identical_on_a_cifar_batch():
    images = torch.randn(16, 3, 32, 32).bfloat16()
    perm = torch.randperm(256)
    a, ga = patchmix(images, 2, 2, perm=perm, backend="torch")
    b, gb = patchmix(images, 2, 2, perm=perm, backend="triton")
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_generator_makes_draws_reproducible():
    images = torch.randn(4, 3, 16, 16)
    a = patchmix(images, 4, 2, generator=torch.Generator().manual_seed(7))
    b = patchmix(images, 4, 2, generator=torch.Generator().manual_seed(7))
    c = patchmix(images, 4, 2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_input_is_not_modified_and_noncontiguous_input_works():
    base = torch.randn(4, 16, 16, 3)
    images = base.permute(0, 3, 1, 2)  # channels-last memory
    before = images.clone()
    perm = torch.randperm(16)
    mixed, _ = patchmix(images, 4, 2, perm=perm)
    assert torch.equal(images, before)
    assert torch.equal(mixed, patchmix_reference(images.contiguous(), 4, 2, perm))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_the_inverse_mix(backend):
    images = torch.randn(5, 2, 8, 8, requires_grad=True)
    upstream = torch.randn(5, 2, 8, 8)
    perm = torch.randperm(16)
    mixed, _ = patchmix(images, 2, 3, perm=perm, backend=backend)
    (grad,) = torch.autograd.grad((mixed * upstream).sum(), images)
    ref_images = images.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad((patchmix_reference(ref_images, 2, 3, perm) * upstream).sum(), ref_images)
    assert torch.equal(grad, expected)


def test_custom_op_passes_torch_opcheck():
    images = torch.randn(3, 3, 8, 8, requires_grad=True)
    group = group_of_positions(torch.randperm(16), 2)
    torch.library.opcheck(torch.ops.patchmix.mix.default, (images, group, 2, "torch"))


def test_compile_fullgraph_has_no_graph_break():
    torch._dynamo.reset()

    def step(x: torch.Tensor) -> torch.Tensor:
        mixed, group = patchmix(x * 2.0, 4, 2)
        return mixed.sum(dim=(1, 2, 3)) + group.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 16, 16)
    # mixing only moves patches between images, so the per-batch sum is preserved.
    assert torch.allclose(compiled(x).sum(), step(x).sum())
    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0


@pytest.mark.slow
def test_compile_fullgraph_with_inductor():
    torch._dynamo.reset()
    perm = torch.randperm(16)

    def mix(x: torch.Tensor) -> torch.Tensor:
        return patchmix(x + 1.0, 4, 2, perm=perm)[0]

    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(torch.compile(mix, fullgraph=True)(x), patchmix_reference(x + 1.0, 4, 2, perm))


def test_default_backend_is_torch_on_cpu_and_triton_under_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") != "1"
    from kernels.patchmix import default_backend

    assert default_backend(torch.zeros(1)) == "torch"
    code = "import torch; from kernels.patchmix import default_backend; print(default_backend(torch.zeros(1)))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "triton"


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=torch.zeros(3, 8, 8)), "images must have 4 dims"),
    (dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8)), "images must be float32, bfloat16 or float16"),
    (dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.float64)), "images must be float32, bfloat16 or float16"),
    (dict(images=torch.zeros(2, 3, 8, 6), patch_size=4), "multiples of patch_size=4"),
    (dict(num_mix=0), r"num_mix must be an int in \[1, T=16\]"),
    (dict(num_mix=17), r"num_mix must be an int in \[1, T=16\]"),
    (dict(perm=torch.arange(15)), r"perm must be an integer tensor of shape \(T,\) = \(16,\)"),
    (dict(perm=torch.arange(16).float()), "perm must be an integer tensor"),
    (dict(perm=torch.zeros(16, dtype=torch.long)), "perm must be a permutation of 0..15"),
    (dict(backend="cuda"), "backend must be None, 'triton' or 'torch'"),
])
def test_bad_input_raises_a_clear_value_error(kwargs, message):
    args = dict(images=torch.zeros(2, 3, 8, 8), patch_size=2, num_mix=2) | kwargs
    images, patch_size, num_mix = args.pop("images"), args.pop("patch_size"), args.pop("num_mix")
    with pytest.raises(ValueError, match=message):
        patchmix(images, patch_size, num_mix, **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_triton_kernel_matches_reference(dtype):
    for batch, channels, height, width, patch in SHAPES + [(256, 3, 224, 224, 16), (512, 3, 32, 32, 2)]:
        images = torch.randn(batch, channels, height, width, device="cuda").to(dtype)
        num_patches = (height // patch) * (width // patch)
        for num_mix in range(1, min(4, num_patches) + 1):
            perm = torch.randperm(num_patches, device="cuda")
            mixed, _ = patchmix(images, patch, num_mix, perm=perm)
            assert torch.equal(mixed, patchmix_reference(images, patch, num_mix, perm))
