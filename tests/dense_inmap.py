"""An independent float64 implementation of InMaP, written from DESIGN.md's step list with the
published in-place Sinkhorn normalisations and the dense N x C matrices: the oracle of the
faithful-mode tests. Shares no code with the package."""
import torch


def dense_inmap(X, T, *, tau_t=0.01, tau_i=0.04, alpha=0.6, sinkhorn_iters=20, gamma=0.0,
                iters=2000, lr=10.0):
    X = torch.nn.functional.normalize(X.double(), dim=1)
    T = torch.nn.functional.normalize(T.double(), dim=0)
    N, C = X.shape[0], T.shape[1]
    S = X @ T
    P = torch.softmax(S / tau_t, dim=1)
    if sinkhorn_iters > 0:
        P = P / N
        if gamma > 0:
            q = P.sum(dim=0) ** gamma
            q = q / q.sum()
        else:
            q = torch.full((C,), 1.0 / C, dtype=torch.float64)
        for _ in range(sinkhorn_iters):
            P = P / P.sum(dim=0, keepdim=True)
            P = P * q[None, :]
            P = P / P.sum(dim=1, keepdim=True)
            P = P / N
        P = P * N
    top, arg = P.max(dim=1)
    confident = top > alpha
    P[confident] = torch.nn.functional.one_hot(arg[confident], C).double()
    B = X.T @ P
    W = T.clone()
    prev = float("inf")
    eta = lr
    norms, lrs = [], []
    for _ in range(iters):
        Q = torch.softmax(X @ W / tau_i, dim=1)
        G = X.T @ Q - B
        g = float(torch.linalg.norm(G))
        if g > prev:
            eta = eta / 2
        prev = g
        W = W - (eta / (N * tau_i)) * G
        W = W / W.norm(dim=0, keepdim=True).clamp_min(1e-12)
        norms.append(g)
        lrs.append(eta)
    return dict(W=W, P=P, B=B, confident=confident, arg=arg, grad_norm=torch.tensor(norms, dtype=torch.float64),
                lr=torch.tensor(lrs, dtype=torch.float64))
