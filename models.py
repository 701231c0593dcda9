"""The four networks of ReDO, layer for layer as in the original implementation.

netEncM  (mask extractor)       image -> soft masks of nMasks regions
netGenX  (region generators)    masks, noise z -> one redrawn region per mask
netDX    (discriminator)        image -> realness score (hinge loss)
netRecZ  (noise reconstructor)  sum of redrawn regions -> z

Module names, parameter names and parameter order are the original's, so that the
published weights and the original's checkpoints load with strict=True and the
original's optimizer states line up. The constructors draw random numbers in the
original's order, so one seed gives the original's initial weights. The original
class names (`_netEncM`, `_netGenX`, `_resDiscriminator128`, `_netRecZ`, ...) stay
importable with their keywords.
"""
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_SIZEX = (128, 64)  # the original's size, and a quarter of its pixels for CPUs


def check_sizex(sizex):
    if sizex not in SUPPORTED_SIZEX:
        raise ValueError("sizex=%s is not supported: ReDO's networks are built for 128x128 images "
                         "(use --sizex 128, or --sizex 64 for a quarter of the pixels)" % sizex)


class SNConv2d(nn.Conv2d):
    """Conv2d with spectral normalisation, stored as torch.nn.utils.spectral_norm stores it.

    Parameters `bias`, `weight_orig` (in that order) and buffers `weight_u`, `weight_v`,
    as in the published weights. As the original: one power iteration per forward call
    in train mode, none in eval mode; u and v are drawn at construction, after the
    convolution's own initialisation.

    The power iteration's new u and v replace the buffers instead of being copied into
    them: a buffer is never changed in place. Under torch.compile (torch 2.14), the
    backward may recompute from the buffer it read rather than keep what it computed, and
    an in-place update then gives it the wrong vectors (README, --compile).
    """

    eps = 1e-12

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        weight = self.weight
        del self.weight
        self.weight_orig = weight
        with torch.no_grad():
            u = F.normalize(weight.new_empty(weight.size(0)).normal_(0, 1), dim=0, eps=self.eps)
            v = F.normalize(weight.new_empty(weight[0].numel()).normal_(0, 1), dim=0, eps=self.eps)
        self.register_buffer("weight_u", u)
        self.register_buffer("weight_v", v)

    def normalized_weight(self):
        with torch.autocast(self.weight_orig.device.type, enabled=False):  # sigma in full precision
            return self._normalized_weight()

    def _normalized_weight(self):
        weight_mat = self.weight_orig.flatten(1)  # (out, in*kh*kw)
        u, v = self.weight_u, self.weight_v
        if self.training:
            with torch.no_grad():
                v = F.normalize(torch.mv(weight_mat.t(), u), dim=0, eps=self.eps)
                u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=self.eps)
                self.weight_v, self.weight_u = v, u
        sigma = torch.dot(u, torch.mv(weight_mat, v))
        return self.weight_orig / sigma

    def forward(self, x):
        return self._conv_forward(x, self.normalized_weight(), self.bias)

    def forward_concat(self, x, extra):
        """forward(torch.cat((x, extra), 1)), computed as two convolutions: oneDNN is much
        slower on an odd channel count such as nf + 1 than on nf plus a 1-channel pass."""
        weight = self.normalized_weight()
        n = x.size(1)
        return (self._conv_forward(x, weight[:, :n], self.bias)
                + self._conv_forward(extra, weight[:, n:], None))

    def forward_avg_pooled(self, x):
        """avg_pool2d(forward(x), 2) for a 3x3 convolution of padding 1, computed as one 4x4
        convolution of stride 2: the same sums, 2.25 times fewer multiplications."""
        weight = _combine_taps(self.normalized_weight(), _TAPS_CONV_THEN_POOL)
        return F.conv2d(x, weight, self.bias, stride=2, padding=1)

    def forward_upsampled(self, x, extra=None):
        """forward(upsample(x)) after a nearest 2x upsampling, computed by upsampled_conv3x3.
        With `extra`, the input is cat((x, extra), 1), convolved apart as in forward_concat."""
        weight = self.normalized_weight()
        n = x.size(1)
        out = upsampled_conv3x3(x, weight[:, :n], self.bias)
        if extra is not None:
            out = out + upsampled_conv3x3(extra, weight[:, n:], None)
        return out


def upsampled_conv3x3(x, weight, bias):
    """conv2d(upsample(x), weight, bias, padding=1), upsample being nearest 2x, computed as one
    4x4 transposed convolution of stride 2 on x: the same sums, 2.25 times fewer multiplications."""
    weight = _combine_taps(weight, _TAPS_UPSAMPLE_THEN_CONV).transpose(0, 1)
    return F.conv_transpose2d(x, weight, bias, stride=2, padding=1)


# Rows: the 4 taps of a 4x4 stride-2 kernel; columns: which taps of a 3x3 kernel they sum.
# conv3x3(pad 1) then 2x2 average pooling: output m reads input rows 2m-1 .. 2m+2.
_TAPS_CONV_THEN_POOL = torch.tensor([[1., 0., 0.], [1., 1., 0.], [0., 1., 1.], [0., 0., 1.]]) / 2
# Nearest 2x upsampling then conv3x3(pad 1), as a transposed convolution (stride 2, pad 1):
# tap t of input row i lands on output row 2i + t - 1.
_TAPS_UPSAMPLE_THEN_CONV = torch.tensor([[0., 0., 1.], [0., 1., 1.], [1., 1., 0.], [1., 0., 0.]])


def _combine_taps(weight, taps):
    """(out, in, 3, 3) kernel -> (out, in, 4, 4): taps applied along both spatial axes."""
    taps = taps.to(weight)
    return torch.einsum("yi,xj,oaij->oayx", taps, taps, weight)


class UpsampledConv1x1(nn.Sequential):
    """Nearest upsampling then a 1x1 convolution (the modules stay in that order, for the
    checkpoints' keys), computed as the convolution then the upsampling: the same numbers,
    exactly, with 4 times fewer multiplications."""

    def forward(self, x):
        upsample, conv = self
        return upsample(conv(x))


class ConvThenAvgPool(nn.Sequential):
    """Layers ending with a 3x3 SNConv2d and a 2x2 average pooling (kept as modules, for the
    checkpoints' keys), the last two computed together by SNConv2d.forward_avg_pooled."""

    def forward(self, x):
        *head, conv, _ = self
        for layer in head:
            x = layer(x)
        return conv.forward_avg_pooled(x)


def init_weights_orthogonal(net, gain, skip_spectral_norm=False):
    """Orthogonal init of every Conv2d / ConvTranspose2d / Linear weight, in module order.

    For spectral-norm convolutions it is `weight_orig` that is initialised, which is what
    the original does when its nets are on the CPU. On a GPU the original's init misses
    them (see README, differences): skip_spectral_norm=True reproduces that.
    """
    for m in net.modules():
        if isinstance(m, SNConv2d):
            # skipping still draws the random numbers, as the original's init of a stale copy did
            nn.init.orthogonal_(torch.empty_like(m.weight_orig) if skip_spectral_norm else m.weight_orig, gain)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.orthogonal_(m.weight, gain)
    return net


class _ChunkedAttention(torch.autograd.Function):
    """softmax(q k^T) v for one head, computed in blocks of queries that stay in the CPU's
    cache. The attention matrix is kept for backward only when a gradient is wanted (the
    plain formula keeps it and several temporaries of its size). Same math as the plain
    formula, less memory traffic.

    q: (B, N, d), k: (B, M, d), v: (B, M, c) -> (B, N, c).
    """
    block = 512

    @staticmethod
    def forward(ctx, q, k, v):
        out = v.new_empty(q.size(0), q.size(1), v.size(2))
        keep = any(ctx.needs_input_grad)
        if keep:  # the whole matrix, for backward
            p = v.new_empty(q.size(0), q.size(1), k.size(1))
        else:  # one block's rows, reused
            p = v.new_empty(_ChunkedAttention.block, k.size(1))
        for b, rows in _ChunkedAttention.blocks(q):
            p_rows = p[b, rows] if keep else p[:rows.stop - rows.start]
            torch.softmax(q[b, rows] @ k[b].t(), dim=-1, out=p_rows)
            torch.mm(p_rows, v[b], out=out[b, rows])
        if keep:
            ctx.save_for_backward(q, k, v, out, p)
        return out

    @staticmethod
    def blocks(q):
        """(batch index, slice of query rows) of each block."""
        for b in range(q.size(0)):
            for n in range(0, q.size(1), _ChunkedAttention.block):
                yield b, slice(n, min(n + _ChunkedAttention.block, q.size(1)))

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _ChunkedAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        saved = ctx.saved_tensors
        q, k, v, out, p, grad_out = (t.float() for t in saved + (grad_out,))  # accumulate in fp32 under autocast
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        row_dot = (grad_out * out).sum(-1, keepdim=True)  # sum_j P_ij dP_ij, for the softmax backward
        for b, rows in _ChunkedAttention.blocks(q):
            p_rows = p[b, rows]
            grad_v[b].addmm_(p_rows.t(), grad_out[b, rows])
            grad_s = (grad_out[b, rows] @ v[b].t()).sub_(row_dot[b, rows]).mul_(p_rows)
            grad_q[b, rows] = grad_s @ k[b]
            grad_k[b].addmm_(grad_s.t(), q[b, rows])
        return tuple(g.to(t.dtype) for g, t in zip((grad_q, grad_k, grad_v), saved))


def attention(q, k, v, sdpa=None):
    """softmax(q k^T) v (no scaling, one head): q (B, N, d), k (B, M, d), v (B, M, c).
    sdpa: torch's fused scaled_dot_product_attention (default on GPUs) rather than our
    cache-blocked CPU kernel; either runs on any device, the same math."""
    if torch.compiler.is_compiling():  # the compiler fuses the plain formula itself
        return torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
    if sdpa is None:
        sdpa = q.device.type != "cpu"
    if not sdpa:
        return _ChunkedAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0).squeeze(1)


class SelfAttention(nn.Module):
    """SAGAN self-attention: queries at every position, keys and values max-pooled by 2."""

    def __init__(self, nf, nh=False):
        super().__init__()
        if not nh:
            nh = max(nf // 8, 1)
        self.f = SNConv2d(nf, nh, 1, bias=False)       # queries
        self.g = SNConv2d(nf, nh, 1, bias=False)       # keys
        self.h = SNConv2d(nf, nf // 2, 1, bias=False)  # values
        self.o = SNConv2d(nf // 2, nf, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.nh = nh
        self.nf = nf

    def forward(self, x):
        B, _, H, W = x.shape
        q = self.f(x).flatten(2).transpose(1, 2)                              # (B, H*W, nh)
        k = F.max_pool2d(self.g(x), kernel_size=2).flatten(2).transpose(1, 2)  # (B, H*W/4, nh)
        v = F.max_pool2d(self.h(x), kernel_size=2).flatten(2).transpose(1, 2)  # (B, H*W/4, nf/2)
        out = attention(q, k, v).transpose(1, 2).contiguous().view(B, self.nf // 2, H, W)  # not channels_last
        return self.o(out) * self.gamma + x


def _res_down_block(nIn, nOut):
    return ConvThenAvgPool(nn.ReLU(),
                           SNConv2d(nIn, nOut, 3, 1, 1, bias=True),
                           nn.ReLU(),
                           SNConv2d(nOut, nOut, 3, 1, 1, bias=True),
                           nn.AvgPool2d(2))


def _res_down_shortcut(nIn, nOut):
    return nn.Sequential(nn.AvgPool2d(2), SNConv2d(nIn, nOut, 1, bias=True))


def _res_last_block(nf):
    return nn.Sequential(nn.ReLU(),
                         SNConv2d(nf, nf, 3, 1, 1, bias=True),
                         nn.ReLU(),
                         SNConv2d(nf, nf, 3, 1, 1, bias=True))


class _ResNet128(nn.Module):
    """Spectral-norm ResNet, 128x128 -> 4x4 (64x64 -> 2x2), summed over space, then a linear layer.

    Shared by the discriminator (optional self-attention after the first block) and the
    noise reconstructor (first block stored in `blocs[0]`, as in the original).
    """

    def _build_down_blocks(self, nf):
        blocs, sc = [], []
        for _ in range(4):
            blocs.append(_res_down_block(nf, nf * 2))
            sc.append(_res_down_shortcut(nf, nf * 2))
            nf *= 2
        blocs.append(_res_last_block(nf))
        sc.append(nn.Identity())
        return blocs, sc, nf

    @staticmethod
    def _first_block(nIn, nf):
        return ConvThenAvgPool(SNConv2d(nIn, nf, 3, 1, 1, bias=True),
                               nn.ReLU(),
                               SNConv2d(nf, nf, 3, 1, 1, bias=True),
                               nn.AvgPool2d(2))

    def _residual_tail(self, x):
        for bloc, sc in zip(self.blocs, self.sc):
            x = bloc(x) + sc(x)
        return self.dense(x.sum(dim=(2, 3)))


class Discriminator(_ResNet128):
    """netDX: spectral-norm ResNet discriminator for 128x128 images (original `_resDiscriminator128`)."""

    def __init__(self, nIn=3, nf=64, selfAtt=False):
        super().__init__()
        self.bloc0 = self._first_block(nIn, nf)
        self.sc0 = _res_down_shortcut(nIn, nf)
        self.selfAtt = SelfAttention(nf) if selfAtt else nn.Identity()
        blocs, sc, nf = self._build_down_blocks(nf)
        self.dense = nn.Linear(nf, 1)
        self.blocs = nn.ModuleList(blocs)
        self.sc = nn.ModuleList(sc)

    def forward(self, x):
        x = self.selfAtt(self.bloc0(x) + self.sc0(x))
        return self._residual_tail(x)


class ResEncoder(_ResNet128):
    """Spectral-norm ResNet encoder for 128x128 images to nOut numbers (original `_resEncoder128`)."""

    def __init__(self, nIn=3, nf=64, nOut=8):
        super().__init__()
        first = self._first_block(nIn, nf)
        first_sc = _res_down_shortcut(nIn, nf)
        blocs, sc, nf = self._build_down_blocks(nf)
        self.dense = nn.Linear(nf, nOut)
        self.blocs = nn.ModuleList([first] + blocs)
        self.sc = nn.ModuleList([first_sc] + sc)

    def forward(self, x):
        return self._residual_tail(x)


class MaskedGenerator(nn.Module):
    """One region generator: draws a sizex x sizex region from noise z, conditioned on its mask.

    Instance norms are modulated by 1x1 convolutions of the noise (`gamma*`, `beta*`), and
    the mask, average-pooled to each resolution, is concatenated before each up-convolution.
    The output is tanh, multiplied by the mask (original `_resMaskedGenerator128`).
    """

    def __init__(self, nf=64, nOut=3, nc=8, selfAtt=False, sizex=128):
        super().__init__()
        self.selfAtt = SelfAttention(nf * 2) if selfAtt else nn.Identity()
        self.start = sizex // 32  # five up-convolutions from start x start
        self.dense = nn.Linear(nc, self.start * self.start * nf * 16)
        layers = {name: [] for name in ("convA", "convB", "normA", "normB",
                                        "gammaA", "gammaB", "betaA", "betaB", "sc")}
        nfPrev = nfNext = nf * 16
        for _ in range(5):
            layers["convA"].append(nn.Sequential(nn.Upsample(scale_factor=2),
                                                 SNConv2d(nfPrev + 1, nfNext, 3, 1, 1, bias=False)))
            layers["convB"].append(SNConv2d(nfNext, nfNext, 3, 1, 1, bias=True))
            layers["normA"].append(nn.InstanceNorm2d(nfPrev, affine=False))
            layers["normB"].append(nn.InstanceNorm2d(nfNext, affine=False))
            layers["gammaA"].append(nn.Conv2d(nc, nfPrev, 1, bias=True))
            layers["gammaB"].append(nn.Conv2d(nc, nfNext, 1, bias=True))
            layers["betaA"].append(nn.Conv2d(nc, nfPrev, 1, bias=True))
            layers["betaB"].append(nn.Conv2d(nc, nfNext, 1, bias=True))
            layers["sc"].append(UpsampledConv1x1(nn.Upsample(scale_factor=2),
                                                  SNConv2d(nfPrev, nfNext, 1, bias=True)))
            nfPrev, nfNext = nfNext, nfNext // 2
        for name, modules in layers.items():
            setattr(self, name, nn.ModuleList(modules))
        self.normOut = nn.InstanceNorm2d(nf, affine=False)
        self.gammaOut = nn.Conv2d(nc, nf, 1, bias=True)
        self.betaOut = nn.Conv2d(nc, nf, 1, bias=True)
        # The original builds an output conv without the mask channel and replaces it at
        # once; building and dropping it draws the same random numbers, so seeds agree.
        SNConv2d(nf, nOut, 3, 1, 1)
        self.convOut = SNConv2d(nf + 1, nOut, 3, 1, 1)

    @staticmethod
    def _modulated_relu(norm, gamma, beta, x, c):
        return F.relu(norm(x) * gamma(c) + beta(c))

    def forward(self, m, z, c):
        """m: (B, 1, sizex, sizex) mask; z: (B, nc, 1, 1) noise; c: (B, nc, 1, 1) conditioning
        (ReDO passes z twice)."""
        x = self.dense(z.view(z.size(0), z.size(1))).view(z.size(0), -1, self.start, self.start)
        mask_ratio = m.size(-1) // self.start
        for k in range(5):
            if k == 4:
                x = self.selfAtt(x)
            h = self._modulated_relu(self.normA[k], self.gammaA[k], self.betaA[k], x, c)
            _, conv = self.convA[k]  # (Upsample, SNConv2d), computed together
            h = conv.forward_upsampled(h, F.avg_pool2d(m, kernel_size=mask_ratio))
            h = self.convB[k](self._modulated_relu(self.normB[k], self.gammaB[k], self.betaB[k], h, c))
            x = h + self.sc[k](x)
            mask_ratio //= 2
        h = self._modulated_relu(self.normOut, self.gammaOut, self.betaOut, x, c)
        return torch.tanh(self.convOut.forward_concat(h, m)) * m


class _downConv(nn.Module):
    def __init__(self, nIn=3, nf=128):
        super().__init__()
        self.mods = nn.Sequential(nn.ReflectionPad2d(3),
                                  nn.Conv2d(nIn, nf // 4, 7, bias=False),
                                  nn.InstanceNorm2d(nf // 4, affine=True),
                                  nn.ReLU(),
                                  nn.Conv2d(nf // 4, nf // 2, 3, 2, 1, bias=False),
                                  nn.InstanceNorm2d(nf // 2, affine=True),
                                  nn.ReLU(),
                                  nn.Conv2d(nf // 2, nf, 3, 2, 1, bias=False),
                                  nn.InstanceNorm2d(nf, affine=True),
                                  nn.ReLU())

    def forward(self, x):
        return self.mods(x)


class _resBloc(nn.Module):
    def __init__(self, nf=128):
        super().__init__()
        self.blocs = nn.Sequential(nn.Conv2d(nf, nf, 3, 1, 1, bias=False),
                                   nn.InstanceNorm2d(nf, affine=True),
                                   nn.ReLU(),
                                   nn.Conv2d(nf, nf, 3, 1, 1, bias=True))
        self.activationF = nn.Sequential(nn.InstanceNorm2d(nf, affine=True), nn.ReLU())

    def forward(self, x):
        return self.activationF(self.blocs(x) + x)


class _upConv(nn.Module):
    def __init__(self, nOut=3, nf=128):
        super().__init__()
        self.mods = nn.Sequential(nn.Upsample(scale_factor=2, mode='nearest'),
                                  nn.Conv2d(nf, nf // 2, 3, 1, 1, bias=False),
                                  nn.InstanceNorm2d(nf // 2, affine=True),
                                  nn.ReLU(),
                                  nn.Upsample(scale_factor=2, mode='nearest'),
                                  nn.Conv2d(nf // 2, nf // 4, 3, 1, 1, bias=False),
                                  nn.InstanceNorm2d(nf // 4, affine=True),
                                  nn.ReLU(),
                                  nn.ReflectionPad2d(3),
                                  nn.Conv2d(nf // 4, nOut, 7, bias=True))

    def forward(self, x):
        _, conv1, norm1, relu1, _, conv2, norm2, relu2, pad, conv3 = self.mods  # upsamplings fused
        x = relu1(norm1(upsampled_conv3x3(x, conv1.weight, conv1.bias)))
        x = relu2(norm2(upsampled_conv3x3(x, conv2.weight, conv2.bias)))
        return conv3(pad(x))


def _pyramid_pooling(nf, size, bins):
    """Pool the features over a bins x bins grid, reduce to one channel, upsample back.

    The window is size // bins, as the original's: at --sizex 64 (size 16) the finest level
    pools 2x2 windows into 8x8 bins rather than 6x6."""
    kernel = size // bins
    return nn.Sequential(nn.AvgPool2d(kernel, kernel),
                         nn.Conv2d(nf, 1, 1),
                         nn.Upsample(size=size, mode='bilinear', align_corners=False))


class MaskExtractor(nn.Module):
    """netEncM: image -> (B, nMasks, H, W) soft masks summing to 1 over regions.

    Down-convolutions, nRes residual blocks, a pyramid-pooling head (1, 2, 3, 6 bins) and
    up-convolutions. Two regions: one sigmoid map m and its complement 1 - m; more: a
    softmax over regions. Both divide the logits by `temperature`. (Original `_netEncM`.)
    """

    def __init__(self, sizex=128, nIn=3, nMasks=2, nRes=5, nf=128, temperature=1):
        super().__init__()
        check_sizex(sizex)
        self.nMasks = nMasks
        size = sizex // 4
        self.cnn = nn.Sequential(_downConv(nIn, nf), *[_resBloc(nf=nf) for _ in range(nRes)])
        self.psp = nn.ModuleList([_pyramid_pooling(nf, size, bins) for bins in (1, 2, 3, 6)])
        self.out = _upConv(1 if nMasks == 2 else nMasks, nf + 4)
        self.temperature = temperature

    def forward(self, x):
        f = self.cnn(x)
        m = self.out(torch.cat([f] + [pool(f) for pool in self.psp], 1))
        if self.nMasks == 2:
            m = torch.sigmoid(m / self.temperature)
            return torch.cat((m, 1 - m), 1)
        return F.softmax(m / self.temperature, dim=1)


class RegionGenerators(nn.Module):
    """netGenX: one MaskedGenerator per region (original `_netGenX`).

    forward(masks (B, K, H, W), z (B, K, nz, 1, 1)) -> redrawn regions (B, K, nOut, H, W),
    each already multiplied by its mask.
    """

    def __init__(self, sizex=128, nOut=3, nc=8, nf=64, nMasks=2, selfAtt=False):
        super().__init__()
        check_sizex(sizex)
        self.net = nn.ModuleList([MaskedGenerator(nf=nf, nOut=nOut, nc=nc, selfAtt=selfAtt, sizex=sizex)
                                  for _ in range(nMasks)])
        self.nMasks = nMasks

    def forward(self, masks, c):
        masks = masks.unsqueeze(2)
        return torch.stack([gen(masks[:, k], c[:, k], c[:, k]) for k, gen in enumerate(self.net)], 1)


class NoiseReconstructor(nn.Module):
    """netRecZ: image -> (B, nMasks, nc, 1, 1) noise (original `_netRecZ`)."""

    def __init__(self, sizex=128, nIn=3, nc=5, nf=64, nMasks=2):
        super().__init__()
        check_sizex(sizex)
        self.net = ResEncoder(nIn=nIn, nf=nf, nOut=nc * nMasks)
        self.nc = nc
        self.nMasks = nMasks

    def forward(self, x):
        return self.net(x).view(x.size(0), self.nMasks, self.nc, 1, 1)


# The original's names, kept for code written against the original models.py.
_netEncM = MaskExtractor
_netGenX = RegionGenerators
_resDiscriminator128 = Discriminator
_netRecZ = NoiseReconstructor
_resEncoder128 = ResEncoder
_resMaskedGenerator128 = MaskedGenerator


def redraw(netGenX, x, masks, z):
    """Redraw each region of x: returns the regions drawn by netGenX (B, K, C, H, W) and
    the composites (B, K, C, H, W), where composite k is x with region k replaced."""
    regions = netGenX(masks, z)
    return regions, regions + (1 - masks.unsqueeze(2)) * x.unsqueeze(1)


@dataclass
class ReDONets:
    """The four networks, under the names the checkpoints use. netRecZ is None when wrecZ == 0."""
    netEncM: Optional[nn.Module] = None
    netGenX: Optional[nn.Module] = None
    netDX: Optional[nn.Module] = None
    netRecZ: Optional[nn.Module] = None

    def items(self):
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def train(self, mode=True):
        for _, net in self.items():
            net.train(mode)

    def eval(self):
        self.train(False)

    def zero_grad(self):
        for _, net in self.items():
            net.zero_grad()

    def to(self, device):
        for _, net in self.items():
            net.to(device)
        return self


NET_BUILDERS = {
    "netEncM": lambda opt: MaskExtractor(sizex=opt.sizex, nIn=opt.nx, nMasks=opt.nMasks, nRes=opt.nResM,
                                         nf=opt.nfM, temperature=opt.temperature),
    "netGenX": lambda opt: RegionGenerators(sizex=opt.sizex, nOut=opt.nx, nc=opt.nz, nf=opt.nfX,
                                            nMasks=opt.nMasks, selfAtt=opt.useSelfAttG),
    "netDX": lambda opt: Discriminator(nIn=opt.nx, nf=opt.nfD, selfAtt=opt.useSelfAttD),
    "netRecZ": lambda opt: NoiseReconstructor(sizex=opt.sizex, nIn=opt.nx, nc=opt.nz, nf=opt.nfZ,
                                              nMasks=opt.nMasks),
}


def build_net(name, opt, device="cpu"):
    """One network from the options (an argparse.Namespace as in the checkpoints), untrained."""
    return NET_BUILDERS[name](opt).to(device)


def build_nets(opt, device="cpu", netRecZ=None, skip_ortho_init_sn=False):
    """The nets of a training run, untrained, with the original's random-number order:
    mask extractor, generators and discriminator are created, then initialised, then the
    noise reconstructor (if wrecZ > 0) is created and initialised. Built on the CPU, so
    that a seed gives the same weights on every device. Restarting after a collapse, the
    original keeps its noise reconstructor and only re-initialises it: pass it as netRecZ.
    skip_ortho_init_sn: --skipOrthoInitSN (see init_weights_orthogonal).
    """
    check_sizex(opt.sizex)
    nets = ReDONets(**{name: build_net(name, opt) for name in ("netEncM", "netGenX", "netDX")})
    for _, net in nets.items():
        init_weights_orthogonal(net, opt.initOrthoGain, skip_ortho_init_sn)
    if opt.wrecZ > 0:
        nets.netRecZ = init_weights_orthogonal(netRecZ or build_net("netRecZ", opt), opt.initOrthoGain, skip_ortho_init_sn)
    return nets.to(device)


def draw_noise(n, nMasks, nz, device=None, generator=None):
    """z for n images: one vector per region, (n, nMasks, nz, 1, 1), drawn from N(0, 1)."""
    return torch.randn((n, nMasks, nz, 1, 1), device=device, generator=generator)


COMPILE_BACKEND = "inductor"  # torch.compile's default, which generates code


def compile_nets(nets, backend=None):
    """--compile: torch.compile on each net, in place, so that the checkpoints keep their keys.
    backend: COMPILE_BACKEND unless given (read at the call, so that tests can swap it)."""
    for _, net in nets.items():
        net.compile(backend=backend or COMPILE_BACKEND)
