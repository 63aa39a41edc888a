#!/usr/bin/env python3
"""PyTorch Multi-VAE training step, timed: the peer figure for `multivaed bench model`.

The model and loss of the paper (I-600-2x200 encoder, 200-600-I decoder, tanh, dropout 0.5 on the
L2-normalised input, multinomial NLL + beta*KL, Adam 1e-3, batch 500) on synthetic users drawn
like multivaed's bench (25-75 items each, popularity skewed as floor(r^3 * I)). PyTorch gets its
best case: the whole synthetic data set lives densely on the device, a batch is a slice.
Prints one JSON object per catalogue size.
  python3 scripts/torch_step_bench.py --device cuda --items 20000,41000 --steps 20
"""
import argparse, json, time

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiVAE(nn.Module):
    def __init__(self, n_items, hidden=600, latent=200):
        super().__init__()
        self.latent = latent
        self.enc = nn.Linear(n_items, hidden)
        self.enc_out = nn.Linear(hidden, 2 * latent)
        self.dec = nn.Linear(latent, hidden)
        self.dec_out = nn.Linear(hidden, n_items)
        for l in (self.enc, self.enc_out, self.dec, self.dec_out):
            nn.init.xavier_normal_(l.weight)
            nn.init.normal_(l.bias, std=0.001)

    def forward(self, x):
        h = F.dropout(F.normalize(x, dim=1), 0.5, training=True)
        h = self.enc_out(torch.tanh(self.enc(h)))
        mu, logvar = h[:, : self.latent], h[:, self.latent :]
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec_out(torch.tanh(self.dec(z))), mu, logvar


def synthetic(n_users, n_items, per_user, gen):
    x = torch.zeros(n_users, n_items)
    for u in range(n_users):
        n = int(torch.randint(per_user // 2, per_user * 3 // 2 + 1, (1,), generator=gen))
        r = torch.rand(n, generator=gen)
        x[u, (r ** 3 * n_items).long().clamp_max(n_items - 1)] = 1.0
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--items", default="20000,41000")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    for n_items in [int(s) for s in a.items.split(",")]:
        gen = torch.Generator().manual_seed(n_items)
        data = synthetic(a.batch * 4, n_items, 50, gen).to(dev)
        model = MultiVAE(n_items).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        update = 0

        def step(s):
            nonlocal update
            start = (s * a.batch) % (data.shape[0] - a.batch + 1)
            x = data[start : start + a.batch]
            logits, mu, logvar = model(x)
            nll = -(F.log_softmax(logits, 1) * x).sum(1).mean()
            kl = (0.5 * (-logvar + logvar.exp() + mu ** 2 - 1)).sum(1).mean()
            beta = min(0.2, update / 200000)
            loss = nll + beta * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            update += 1
            return loss

        for s in range(3):  # warm-up: cuBLAS handles, allocator pools
            step(s)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(a.steps):
            loss = step(s)
        loss.item()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / a.steps
        print(json.dumps({"impl": "pytorch " + torch.__version__, "device": a.device,
                          "items": n_items, "step_seconds": sec, "steps": a.steps}), flush=True)


if __name__ == "__main__":
    main()
