#!/usr/bin/env bash
# GPU benchmark, for a machine with an NVIDIA GPU, Python with PyTorch (CUDA), and NO Rust toolchain.
# Runs the prebuilt `cuda` binary (scripts/build-cuda.sh) on CUDA and on the CPU, and the PyTorch
# Multi-VAE step (scripts/torch_step_bench.py) on the same GPU, then prints one markdown table.
#   scripts/gpu-bench.sh [BINARY]          (default dist/multivaed-cuda)
# Environment:
#   ITEMS=20000,41000,100000   catalogue sizes of the synthetic step/scoring benchmark
#   ML100K_SPLIT=DIR           optional: the reference ML-100K split -> 200 epochs on CUDA, test NDCG@100
#   GOWALLA=DIR                optional: gowalla/train.txt -> seconds per epoch on CUDA and on the CPU
#   OUT_DIR=DIR                where the JSON results go (default gpu-bench-out)
#   PYTHON=python3
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-dist/multivaed-cuda}
items=${ITEMS:-20000,41000,100000}
out=${OUT_DIR:-gpu-bench-out}
py=${PYTHON:-python3}
mkdir -p "$out"
log() { echo "== $*" >&2; }

# The binary loads libcuda from the driver and cuBLAS/cuRAND/NVRTC/cudart 13 at start: use the
# CUDA 13 libraries PyTorch's wheels bring.
cu=$("$py" - <<'PY' 2>/dev/null
import glob, os, site
for d in site.getsitepackages():
    hits = glob.glob(os.path.join(d, "nvidia", "cu13", "lib")) + glob.glob(os.path.join(d, "nvidia", "*", "lib"))
    for h in hits:
        if glob.glob(os.path.join(h, "libcublas.so.13*")):
            print(h); raise SystemExit
PY
)
[ -n "$cu" ] || cu=$(dirname "$(find / -name 'libcublas.so.13*' 2>/dev/null | head -n 1)")
libs=$cu
for d in $(ls -d "$(dirname "$cu")"/../*/lib 2>/dev/null); do libs=$libs:$d; done
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
cpus=$(nproc)
log "GPU: $gpu; CPU cores: $cpus; CUDA libraries: $cu"
chmod +x "$bin" 2>/dev/null
missing=$(ldd "$bin" | grep 'not found')
[ -z "$missing" ] || log "missing libraries: $missing"

log "multivaed on CUDA: training step and top-100 scoring at $items items"
timeout 300 "$bin" bench model --device cuda:0 --items "$items" --dense-at 0 --steps 20 \
  --score-users 5000 --json "$out/multivaed-cuda.json" >&2 || log "multivaed CUDA bench failed ($?)"
log "PyTorch on CUDA: training step at $items items"
timeout 300 "$py" "$here/torch_step_bench.py" --device cuda --items "$items" --steps 20 \
  > "$out/torch-cuda.jsonl" || log "PyTorch CUDA bench failed ($?)"
log "multivaed on the CPU ($cpus cores): 41000 items"
timeout 300 "$bin" bench model --device cpu --items 41000 --dense-at 0 --steps 3 \
  --score-users 2000 --json "$out/multivaed-cpu.json" >&2 || log "multivaed CPU bench failed ($?)"
log "PyTorch on the CPU ($cpus cores): 41000 items"
timeout 300 "$py" "$here/torch_step_bench.py" --device cpu --items 41000 --steps 3 \
  > "$out/torch-cpu.jsonl" || log "PyTorch CPU bench failed ($?)"
if [ -n "${ML100K_SPLIT:-}" ]; then
  log "ML-100K reference split, 200 epochs on CUDA"
  timeout 300 "$bin" eval --split "$ML100K_SPLIT" --epochs 200 --seed 1 --device cuda:0 --json \
    > "$out/ml100k-cuda.json" || log "ML-100K on CUDA failed ($?)"
fi
if [ -n "${GOWALLA:-}" ]; then
  for dev in cuda:0 cpu; do
    log "Gowalla, 2 epochs on $dev"
    timeout 300 "$bin" eval --data "$GOWALLA/train.txt" --format lines --epochs 2 --device "$dev" --json \
      > "$out/gowalla-${dev%%:*}.json" || log "Gowalla on $dev failed ($?)"
  done
fi

GPU="$gpu" CPUS="$cpus" "$py" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    if not os.path.exists(p) or os.path.getsize(p) == 0:
        return []
    text = open(p).read().strip()
    return json.loads(text) if text.startswith("[") else [json.loads(l) for l in text.splitlines() if l.startswith("{")]
ours, torch_gpu = load("multivaed-cuda.json"), load("torch-cuda.jsonl")
ours_cpu, torch_cpu = load("multivaed-cpu.json"), load("torch-cpu.jsonl")
cpu_step = {r["items"]: r["step_seconds"] for r in ours_cpu}
torch_cpu_step = {r["items"]: r["step_seconds"] for r in torch_cpu}
torch_step = {r["items"]: r["step_seconds"] for r in torch_gpu}
print(f"GPU: {os.environ['GPU']}; CPU: {os.environ['CPUS']} cores\n")
print("| items | multivaed CUDA step (ms) | PyTorch CUDA step (ms) | multivaed / PyTorch | multivaed CPU step (ms) | CPU / CUDA | PyTorch CPU step (ms) | CUDA top-100 users/s | CUDA 1-user fold-in (ms) |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
fmt = lambda v, f="{:.1f}": f.format(v) if v is not None else "–"
for r in ours:
    n, s = r["items"], r["step_seconds"]
    t, c, tc = torch_step.get(n), cpu_step.get(n), torch_cpu_step.get(n)
    print(f"| {n} | {s*1e3:.2f} | {fmt(t and t*1e3, '{:.2f}')} | {fmt(t and s/t, '{:.2f}')} | {fmt(c and c*1e3)} | {fmt(c and c/s)} | {fmt(tc and tc*1e3)} | {r['users_per_second']:.0f} | {r['single_user_ms']:.2f} |")
for name, label in [("ml100k-cuda.json", "ML-100K reference split, CUDA"), ("gowalla-cuda.json", "Gowalla, CUDA"), ("gowalla-cpu.json", "Gowalla, CPU")]:
    p = os.path.join(out, name)
    if os.path.exists(p) and os.path.getsize(p):
        try:
            line = [l for l in open(p).read().splitlines() if l.startswith("{")][-1]
            rep = json.loads(line)["multivae"]
            print(f"\n{label}: {rep['train_seconds_per_epoch']:.3f} s/epoch, test NDCG@100 {rep['ndcg@100']:.4f}, Recall@20 {rep['recall@20']:.4f} (best epoch {rep['best_epoch']})")
        except Exception as e:
            print(f"\n{label}: unreadable report ({e})")
PY
