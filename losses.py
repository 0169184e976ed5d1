"""The tutorial's four GAN losses (its section 4), WGAN-GP's gradient penalty and WGAN's clipping.

Every score is D's raw output (a logit, no Sigmoid), and every loss is a scalar to *minimise*.
Shared by gan_fc.py and gan_conv.py; test_gans.py checks each line against hand-computed values.
"""
import torch
import torch.nn.functional as F

LOSSES = ("bce", "lsgan", "wgan", "wgan-gp")


def _check(name):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")


def discriminator_loss(name, real_scores, fake_scores):
    """D's (the critic's) loss on raw scores. For 'wgan-gp' the caller adds the gradient penalty."""
    _check(name)
    # In fp32 even under bf16 autocast: a mean of 128 bf16 values keeps only about 3 digits.
    real = real_scores.float()
    fake = fake_scores.float()
    if name == "bce":
        # GAN, arXiv 1406.2661, eq. 1: D maximises log D(x) + log(1 - D(G(z))), D = sigmoid(s).
        # As a loss: BCE(s_real, 1) + BCE(s_fake, 0). On logits, not Sigmoid + BCELoss: the same
        # function, but numerically stable and allowed under autocast (BCELoss raises there).
        real_term = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        fake_term = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        return real_term + fake_term
    if name == "lsgan":
        # LSGAN, arXiv 1611.04076, eq. 2 with a=0, b=1: 1/2 E[(D(x) - 1)^2] + 1/2 E[D(G(z))^2].
        return 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean()
    # WGAN, arXiv 1701.07875, Algorithm 1: the critic *maximises* E[D(x)] - E[D(G(z))], so its
    # loss is E[D(G(z))] - E[D(x)]. (Tutorial 4.4 writes the objective as the loss: the wrong sign.)
    return fake.mean() - real.mean()


def generator_loss(name, fake_scores):
    """G's loss on D's raw scores for G's samples."""
    _check(name)
    fake = fake_scores.float()
    if name == "bce":
        # Non-saturating, arXiv 1406.2661, section 3: maximise log D(G(z)): BCE(s_fake, 1).
        # Minimising log(1 - D(G(z))) gives G no gradient early on, when D rejects every fake.
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if name == "lsgan":
        # LSGAN, arXiv 1611.04076, eq. 2 with c=1: 1/2 E[(D(G(z)) - 1)^2].
        return 0.5 * ((fake - 1) ** 2).mean()
    # WGAN, arXiv 1701.07875, Algorithm 1 (and WGAN-GP): G minimises -E[D(G(z))].
    return -fake.mean()


def gradient_penalty(critic, real, fake, labels=None):
    """WGAN-GP, arXiv 1704.00028, eq. 3: E[(||grad D(x~)||_2 - 1)^2] at x~ = a*real + (1-a)*fake.

    a ~ U(0, 1), one per sample, broadcast over the sample's other dimensions, so (B, 784) and
    (B, 1, 28, 28) both work (the tutorial's (B, 1) broadcasts for flat inputs only). The norm is
    over each sample's flattened gradient. create_graph=True makes the penalty differentiable in
    the critic's parameters, so its backward() trains the critic. No .grad is written here.
    labels: a conditional critic's classes, one per pair: real[i] and fake[i] share labels[i], so
    each interpolate lies between two images of one class and is scored with that class.
    """
    # In fp32 even under --amp: this is a gradient of a gradient, where bf16 rounding adds up.
    with torch.autocast(real.device.type, enabled=False):
        real = real.detach()
        fake = fake.detach().to(real.dtype)  # G's fakes are bf16 under --amp
        a = torch.rand(real.size(0), *[1] * (real.dim() - 1), device=real.device, dtype=real.dtype)
        # a*x + (1-a)*x^: the tutorial prints a*x - (1-a)*x^, which is not between the two samples.
        x = (a * real + (1 - a) * fake).requires_grad_(True)
        if labels is None:
            scores = critic(x)
        else:
            scores = critic(x, labels)
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
        return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


@torch.no_grad()
def clip_weights(module, c):
    """WGAN, arXiv 1701.07875, Algorithm 1, line 7: clamp every critic parameter to [-c, c]."""
    for parameter in module.parameters():
        parameter.clamp_(-c, c)
