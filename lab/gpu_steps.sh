#!/usr/bin/env bash
# Runs named GPU steps one after another, each under its own time limit, logs each to $OUT/<name>.log
# and writes $OUT/summary.md last (step, exit status, seconds); then packs the rest into $OUT/results.tgz
# (PACK=0 leaves it unpacked). One device call = one invocation:
#
#   OUT=/tmp/o lab/gpu_steps.sh tests bench-1024-512 bench-1024-512-fp8
#
# Steps are defined below; add one as a `step_<name>` function. Runs from the repo root with the
# machine's python3 and jax-triton carried in .carry/ (WORKSPACE.md).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.:.carry
OUT=${OUT:-/tmp/gpu_steps}
mkdir -p "$OUT"
PY=python3
# Every process gets JAX's persistent compilation cache (step_bench's engines turn theirs off), so later processes
# of a call reuse earlier ones' compiles, and with it XLA's per-fusion autotuning cache, a folder inside it. That
# folder alone (small: text protos) travels between calls: read from $AUTOTUNE_IN (.carry/xla_autotune.tgz, where
# the last call's $OUT/xla_autotune.tgz is copied: WORKSPACE.md), written back at the end.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/nanoflow_jax/jax_cache}
AUTOTUNE_DIR=$JAX_COMPILATION_CACHE_DIR/xla_gpu_per_fusion_autotune_cache_dir
AUTOTUNE_IN=${AUTOTUNE_IN:-.carry/xla_autotune.tgz}
mkdir -p "$AUTOTUNE_DIR"
if [[ -f $AUTOTUNE_IN ]]; then
  tar xzf "$AUTOTUNE_IN" -C "$AUTOTUNE_DIR" && echo "autotune cache: $(find "$AUTOTUNE_DIR" -type f | wc -l) results carried in"
fi

run_bench() {  # run_bench MODEL NAME WORKLOAD NUM_REQUESTS [extra flags...]
  local model=$1 name=$2 workload=$3 n=$4; shift 4
  $PY launch/benchmark.py --model="$model" --random_weights --workload="$workload" \
    --num_requests="$n" --dense_batch=2048 --max_num_seqs=1024 \
    --json_out="$OUT/$name.json" --plot_out="$OUT/$name.png" "$@"
}
bench() { run_bench llama-3-8b "$@"; }
# served NAME "SERVE FLAGS" BENCH FLAGS...: serve.py (SERVE_MODEL, default the 8B shape; random weights) in the
# background until /health answers, benchmark.py --url against it (JSON to NAME.json), then SIGINT and wait.
served() {
  local name=$1 sflags=$2; shift 2
  local port=8123 model=${SERVE_MODEL:-llama-3-8b}
  $PY launch/serve.py --model="$model" --random_weights $sflags --port=$port > "$OUT/$name-server.log" 2>&1 &
  local spid=$! t=0
  until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
    sleep 2; t=$((t + 2))
    if ! kill -0 $spid 2> /dev/null || (( t > 400 )); then
      echo "server did not come up"; tail -20 "$OUT/$name-server.log"; kill $spid; return 1; fi
  done
  $PY launch/benchmark.py --url="http://127.0.0.1:$port" --model="$model" "$@" --json_out="$OUT/$name.json"
  local rc=$?; kill -INT $spid; wait $spid; return $rc
}   # bench NAME WORKLOAD NUM_REQUESTS [extra flags...]
# bench70 NAME TP WORKLOAD NUM_REQUESTS [extra flags...]: LLaMA-2-70B shape, tensor parallel
bench70() { local name=$1 tp=$2; shift 2; run_bench llama-2-70b "$name" "$@" --tp="$tp"; }

step_env()                { nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv || true
                            $PY -c "import jax, sys; print(sys.version.split()[0], jax.__version__, jax.devices())"; }
step_tests()              { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q -x tests/gpu --ignore=tests/gpu/test_tp_gpu.py; }
step_tests-hardware()     { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_kernels_gpu.py -k hopper_keeps; }
step_tests-multihost()    { XLA_PYTHON_CLIENT_PREALLOCATE=false NANOFLOW_GPU_TESTS=1 $PY -m pytest -q -s tests/gpu/test_multihost_gpu.py; }
step_tests-engine()       { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_engine_gpu.py; }
step_tests-tp()           { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_tp_gpu.py; }
step_bench-1024-512()     { bench bench-1024-512 1024-512 1000; }
step_bench-1024-512-fp8() { bench bench-1024-512-fp8 1024-512 1000 --kv_cache_dtype=fp8; }
# Issue 26: fp8 weights and activations (W8A8) against bf16 weights, fp8 KV cache in both, power sampled.
step_tests-fp8()          { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q -s tests/gpu/test_fp8_gpu.py; }
step_fp8-gemm()           { $PY lab/fp8_gemm.py --rows=2048,512,128 --mosaic --write_configs --out="$OUT/fp8-gemm.md" && \
                              cp pallas_kernels/gemm_fp8_configs.json "$OUT/"; }   # commit it if ours is kept
step_bench-1024-512-w8()  { bench bench-1024-512-w8 1024-512 1000 --kv_cache_dtype=fp8 --quantization=fp8 --power_sample_ms=100; }
# Our fp8 GEMM (issue 26): the step with each fp8 GEMM (kernel time by kind from a trace: also where the
# activation quantization's passes stand), then the full run with ours.
step_step-fp8-gemms()     { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --quantization=fp8 --kv_cache_dtypes=fp8 \
                              --nanoflow=false --iters=5 --fp8_gemms=xla,mosaic --trace_dir="$OUT/trace-fp8-gemms" \
                              --out="$OUT/step-fp8-gemms.md"; }
step_bench-1024-512-w8-mosaic() { bench bench-1024-512-w8-mosaic 1024-512 1000 --kv_cache_dtype=fp8 --quantization=fp8 \
                              --fp8_gemm=mosaic --power_sample_ms=100; }
# Issue 27: each step dispatched on a thread of its own (--overlap_dispatch): the host's time per step becomes the
# longer of the dispatch and the engine's Python instead of their sum. One process, one fp8 load: inline, then
# the same workload with the thread (--compare=overlap).
step_bench-1024-512-w8-overlap() { bench bench-1024-512-w8-overlap 1024-512 1000 --kv_cache_dtype=fp8 --quantization=fp8 \
                              --compare=overlap --power_sample_ms=100; }
step_bench-1024-512-w16() { bench bench-1024-512-w16 1024-512 1000 --kv_cache_dtype=fp8 --power_sample_ms=100; }
# Session 24: bf16 with the layers unrolled (the small steps' fix if decode-split shows it) against the scanned
# default above: issue 27 asks the large step no slower (within 1%). Cold compiles of the unrolled buckets ~3-4 min.
step_bench-1024-512-w16-unrolled() { bench bench-1024-512-w16-unrolled 1024-512 1000 --kv_cache_dtype=fp8 --layer_loop=unrolled \
                              --power_sample_ms=100; }
# Session 30: bf16 with the hybrid layer loop (steps below 512 tokens unrolled over the stacks, larger ones scanned)
# against the scanned default above. With static slices each small bucket compiled in 35-43 s, cold, on an H100;
# with the traced layer index predicted 5-10 s.
step_bench-1024-512-w16-hybrid() { bench bench-1024-512-w16-hybrid 1024-512 1000 --kv_cache_dtype=fp8 --layer_loop=hybrid \
                              --power_sample_ms=100; }
step_bench-1000-1000-w8() { bench bench-1000-1000-w8 1000-1000 1000 --kv_cache_dtype=fp8 --quantization=fp8 --power_sample_ms=100; }
step_bench-1000-1000-w16() { bench bench-1000-1000-w16 1000-1000 1000 --kv_cache_dtype=fp8 --power_sample_ms=100; }
step_bench-1000-1000-w8-3k() { bench bench-1000-1000-w8-3k 1000-1000 3000 --kv_cache_dtype=fp8 --quantization=fp8 --power_sample_ms=100; }
step_bench-1024-512-fp8-d4096() { bench bench-1024-512-fp8-d4096 1024-512 1000 --kv_cache_dtype=fp8 --dense_batch=4096; }
step_bench-splitwise()    { bench bench-splitwise splitwise 1000; }
step_bench-splitwise-fp8(){ bench bench-splitwise-fp8 splitwise 1000 --kv_cache_dtype=fp8; }
step_online-1024-512()    { bench online-1024-512 1024-512 400 --rates=6,10,13; }
step_bench-512-1024-400() { bench bench-512-1024 512-1024 400; }
step_bench-512-512()      { bench bench-512-512 512-512 600; }
step_bench-512-1024()     { bench bench-512-1024 512-1024 600; }
step_bench-1024-512-nanoflow() { bench bench-1024-512-nanoflow 1024-512 1000 --mode=nanoflow --compare=sequential; }
step_bench-lmsys()        { bench bench-lmsys lmsys 1000 --mode=nanoflow --compare=sequential; }
step_bench-sharegpt()     { bench bench-sharegpt sharegpt 1000 --mode=nanoflow --compare=sequential; }
step_bench-512-1024-fp8() { bench bench-512-1024-fp8 512-1024 600 --kv_cache_dtype=fp8; }
step_tp2-1024-512()       { bench70 tp2-1024-512 2 1024-512 400 --mode=nanoflow --compare=sequential; }
step_tp4-1024-512()       { bench70 tp4-1024-512 4 1024-512 500 --mode=nanoflow --compare=sequential; }
# Two layers per scan step: the layer boundary inside the body lets nano-batch 1's last all-reduce run beside
# nano-batch 0's next qkv (prediction in perf-notes, session 7). The generic split, not the shipped whole batch.
step_tp4-1024-512-u2()    { bench70 tp4-1024-512-u2 4 1024-512 500 --mode=nanoflow --compare=sequential --layer_unroll=2 \
                              --pipeline_config=generic; }
step_tp4-1024-512-seq()   { bench70 tp4-1024-512-seq 4 1024-512 800; }
step_tp4-splitwise()      { bench70 tp4-splitwise 4 splitwise 400 --mode=nanoflow --compare=sequential --trace_dir="$OUT/trace-tp4" --trace_steps=150:153; }
# Session 13: the board's power over the 70B TP-4 steady state (the bound any schedule of the step's work
# has, as session 10 measured on one GPU), and the Splitwise trace in both modes with the shipped config.
step_tp4-1024-512-power() { bench70 tp4-1024-512-power 4 1024-512 500 --mode=sequential --power_sample_ms=100; }
step_tp4-splitwise-both() { bench70 tp4-splitwise-both 4 splitwise 400 --mode=nanoflow --compare=sequential \
                              --power_sample_ms=100; }
# An fp8 KV cache at TP 4 (fewer bytes, so fewer joules, per decode), and a run long enough for the steady
# state to outweigh the tail of decode-only steps (500 requests: 286 full steps, then 511 of <= 500 decodes).
step_tp4-1024-512-fp8()   { bench70 tp4-1024-512-fp8 4 1024-512 500 --mode=sequential --kv_cache_dtype=fp8 --power_sample_ms=100; }
step_tp4-1024-512-long()  { bench70 tp4-1024-512-long 4 1024-512 1500 --mode=sequential --power_sample_ms=100; }
# The step's all-reduce alone, timed inside one computation, under NCCL's protocol/algorithm/channel settings.
step_collectives-tp()     { $PY lab/collective_bench.py --rows=512,1024,2048 --out="$OUT/collectives-tp.md" \
                              --variants=default,NCCL_PROTO=Simple,NCCL_PROTO=LL128,NCCL_PROTO=LL,NCCL_ALGO=Ring,NCCL_ALGO=Tree,NCCL_MIN_NCHANNELS=32,NCCL_MAX_NCHANNELS=8; }
# NCCL's channel (CTA) count for an all-reduce over all GPUs (4 H200s: 24; NETWORK_SMS in runtime/plan.py).
step_nccl-channels()      { NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,TUNING $PY -c "import jax, jax.numpy as jnp; n=jax.device_count(); print(jax.pmap(lambda x: jax.lax.psum(x, 'i'), 'i')(jnp.ones((n, 4096, 8192), jnp.bfloat16)).sum())" 2>&1 | sed 's/.*NCCL INFO //' | grep -iE "channel|nvls|ctas|rings|trees" | sort | uniq -c | sort -rn | head -40; }
step_step()               { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --gemms=mosaic_fused \
                              --kv_cache_dtypes=fp8,auto --nanoflow=false --out="$OUT/step.md"; }
step_step-decode()        { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --gemms=mosaic,xla \
                              --kv_cache_dtypes=fp8,auto --decodes=640 --context=1280 --prefill=0 --nanoflow=false \
                              --out="$OUT/step-decode.md"; }
step_step-slots()         { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --max_num_seqs=1024 \
                              --nanoflow=false --trace_dir="$OUT/trace-slots" --out="$OUT/step-slots.md"; }
step_bench-trace()        { bench bench-trace 1024-512 1000 --trace_dir="$OUT/trace-bench" --trace_steps=400:404; }
step_step-small()         { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --gemms=mosaic_fused \
                              --decodes=128 --context=1500 --prefill=0 --nanoflow=false --trace_dir="$OUT/trace-small" \
                              --out="$OUT/step-small.md"; }
# The long runs' tail step (session 9: 2588 of 4034 steps of bench-lmsys-8k held a median 2 decodes, 13.4 ms
# each): where its time goes, by kernel kind.
# --dense_batch=2048: the engine's bucket ladder, so the 4 tokens run the 128-row bucket (session 9's call ran 16).
step_step-tail()          { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --gemms=mosaic,xla \
                              --decodes=4 --context=600 --prefill=0 --max_num_seqs=2048 --dense_batch=2048 --nanoflow=false \
                              --trace_dir="$OUT/trace-tail" \
                              --out="$OUT/step-tail.md"; }
# Session 10: the host launches each of a small step's ~430 kernels (ExecuteThunks 7.8 ms of a 9.1 ms tail
# step; the GPU idles 4.3 ms of it). Which XLA command-buffer settings capture the layer loop, by step
# (tail: 4 decodes in the 128-row bucket; mix: 512 decodes + 1536 prefill)? One process per setting.
CB_XLA_DEFAULT="--xla_gpu_command_buffer_scheduling_mode=LHS --xla_gpu_enable_latency_hiding_scheduler=true"
CB_WHILE="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE $CB_XLA_DEFAULT"
CB_NANOFLOW_WHILE="--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL,WHILE --xla_gpu_command_buffer_scheduling_mode=CONCURRENT --xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_latency_hiding_scheduler=false"
export CB_XLA_DEFAULT CB_WHILE CB_NANOFLOW_WHILE
step_step-cb()            { local tail="--decodes=4 --context=600 --prefill=0 --max_num_seqs=2048 --dense_batch=2048"
                            for v in "xla-default|$CB_XLA_DEFAULT|$tail" "while|$CB_WHILE|$tail" "nanoflow||$tail" \
                                     "nanoflow-while|$CB_NANOFLOW_WHILE|$tail" "mix-xla-default|$CB_XLA_DEFAULT|" "mix-while|$CB_WHILE|"; do
                              IFS='|' read -r name xf shape <<< "$v"
                              echo "== $name: XLA_FLAGS=$xf"
                              XLA_FLAGS="$xf" $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --gemms=mosaic_fused \
                                --nanoflow=false --iters=20 $shape --out="$OUT/step-cb-$name.md" 2>&1 | grep -E "^\||step:|Error|error" | tail -8
                            done; }
# fp8_sweep KIND NAME CHANGES...: kernel_bench's attention sweep on an fp8 cache, the engine's configuration of
# KIND (decode or prefill; the first row) and each CHANGES (key=value,...) to it, in one run.
fp8_sweep() { local kind=$1 name=$2; shift 2
              $PY lab/kernel_bench.py --sweep_attention --sweep_kinds="$kind" --attention_backends=triton \
                --attention_kv_dtype=fp8 --skip_gemm --out_dir="$OUT/$name" "${@/#/--sweep_variant=}"; }
# Session 17: the fp8 decode kernel's occupancy (more CTAs per SM: fp8 tiles take half the shared memory), fewer
# warps (fewer cross-warp reductions per key block) and the scores' dot on e4m3 operands (dot_fp8), against the
# engine's DECODE_CONFIG_FP8 of the time.
step_sweep-fp8-s17()      { fp8_sweep decode sweep-fp8-s17 programs_per_sm=3 num_stages=2,programs_per_sm=3 \
                              block_n=64,programs_per_sm=4 block_n=64,programs_per_sm=4,num_stages=4 \
                              block_n=64,num_warps=2,programs_per_sm=6 block_n=64,num_warps=2,programs_per_sm=8 \
                              num_warps=2,programs_per_sm=4 prefetch_pages=1 dot_fp8=1 dot_fp8=1,swap_ab=1 \
                              dot_fp8=1,swap_ab=1,prefetch_pages=1 dot_fp8=1,block_n=64,programs_per_sm=4 \
                              dot_fp8=1,swap_ab=1,block_n=64,programs_per_sm=4 \
                              dot_fp8=1,block_n=64,num_warps=2,programs_per_sm=6; }
# Session 18's follow-ups (fp8 cache): around the new decode configuration, and the prefill kernel (~3.8 ms of the
# 46 ms fp8 step, at 0.35-0.39 of the GEMM peak in bf16) in the same spirit (fewer warps, more CTAs).
step_sweep-fp8-decode2()  { fp8_sweep decode sweep-fp8-decode2 programs_per_sm=12 programs_per_sm=20 programs_per_sm=24 \
                              block_n=32 block_n=32,programs_per_sm=24 block_n=128,programs_per_sm=12 num_stages=1 \
                              prefetch_pages=1,num_stages=3; }
step_sweep-fp8-prefill()  { fp8_sweep prefill sweep-fp8-prefill num_warps=4 num_warps=4,programs_per_sm=2 \
                              block_q=16,num_warps=4,programs_per_sm=2 block_q=64 block_n=32 block_n=128 num_stages=2 \
                              num_stages=4 prefetch_pages=1 programs_per_sm=2 dot_f16=1 \
                              dot_f16=1,num_warps=4,programs_per_sm=2; }
# Session 22: the fp8 prefill configuration on the step's own prefill (step_bench's 1536-token chunk; 1024/512's
# steady steps: a 1024-token prompt and a 512-token one): 384 work items against 264 programs, causal, so balance
# (heavy_first, key_splits, programs per SM, block_q) may matter more than on the 4096-token prompt swept before.
step_sweep-fp8-prefill-step() { for chunks in 1536 1024,512; do
                              $PY lab/kernel_bench.py --sweep_attention --sweep_kinds=prefill --attention_backends=triton \
                                --attention_kv_dtype=fp8 --skip_gemm --prefill_chunks=$chunks \
                                --out_dir="$OUT/sweep-fp8-prefill-step-${chunks/,/-}" \
                                $(printf -- "--sweep_variant=%s " heavy_first=1 dynamic_work=1 dynamic_work=1,heavy_first=1 \
                                  dynamic_work=1,heavy_first=1,key_splits=2 dynamic_work=1,heavy_first=1,block_q=16 \
                                  programs_per_sm=1 programs_per_sm=3 programs_per_sm=4 block_q=16 block_q=64 \
                                  key_splits=2 key_splits=2,heavy_first=1 num_stages=2 block_n=128); done; }
# Session 22: larger KV pages for the fp8 cache. A page of one KV head is page_size x 128 bytes in e4m3 (2 KB at
# the engine's 16), read from scattered places; each 64-key block loads 4 page ids before its K/V. The engine's fp8
# configurations and a few variants at pages of 16, 32 and 64 tokens (decode: 512 sequences at context 1024;
# prefill: the 1536-token chunk). Predicted: decode +5-10% at 32, +8-15% at 64.
step_sweep-fp8-pages()    { for ps in 16 32 64; do
                              $PY lab/kernel_bench.py --sweep_attention --sweep_kinds=decode,prefill --attention_backends=triton \
                                --attention_kv_dtype=fp8 --skip_gemm --attention_page_size=$ps --prefill_chunks=1536 \
                                --out_dir="$OUT/sweep-fp8-pages-$ps" \
                                $(printf -- "--sweep_variant=%s " block_n=128 programs_per_sm=8 num_stages=3); done; }
# Session 22: the fp8 decode attention on contexts of unequal length (1000/1000's run: 1000 to 2000; here a mean of
# 1500, -+33%), the fixed share of work items per program against dynamic_work (items taken from a counter), and
# the same on equal contexts (what the counter costs when the share was already even).
step_sweep-fp8-decode-spread() { for spread in 0.33 0; do
                              $PY lab/kernel_bench.py --sweep_attention --sweep_kinds=decode --attention_backends=triton \
                                --attention_kv_dtype=fp8 --skip_gemm --decode_context=1500 --decode_spread=$spread \
                                --out_dir="$OUT/sweep-fp8-decode-spread-$spread" \
                                $(printf -- "--sweep_variant=%s " dynamic_work=1 dynamic_work=1,programs_per_sm=8 \
                                  dynamic_work=1,programs_per_sm=24); done; }
# Session 22 (issue 27): the 8B GEMMs at decode sizes in weight TB/s against the same run's copy bandwidth: bf16,
# the engine's fp8 path, the bare fp8 dot and W8A16 (the weight converted in XLA's GEMM fusion).
step_fp8-gemm-small()     { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_kernels_gpu.py -k small_gemm_fp8
                            $PY lab/fp8_gemm.py --rows=1,8,32 --out="$OUT/fp8-gemm-small.md"; }
step_tests-gemm-fp8()     { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_kernels_gpu.py -k "gemm_fp8" && \
                              NANOFLOW_GPU_TESTS=1 $PY -m pytest -q -s tests/gpu/test_fp8_gpu.py -k "two_layer"; }
# Session 30: our fp8 GEMM in the engine put 13 of 16 first tokens apart from XLA's dot on 32 layers: gate_up from
# the stacks (never run on a GPU), then ours, XLA's and the reference path on two layers of the 8B shape.
step_fp8-gemm-diag()      { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_kernels_gpu.py -k "silu_mul_gate_up"
                            NANOFLOW_GPU_TESTS=1 $PY -m pytest -q -s tests/gpu/test_fp8_gpu.py -k "two_layer" 2>&1 | grep -v "^W"; }
step_tests-fp8-scores()   { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q -x tests/gpu/test_kernels_gpu.py -k "fp8_scores or fp8_cache"; }
# Issue 27's online latency at low rates through the server (1024/512, fp8 weights and KV): serve.py in the
# background, benchmark --url against it. SERVE_MODEL/SERVE_FLAGS/RATES/N override (the CPU check: tiny).
step_online-low-w8()      { served online-low-w8 "${SERVE_FLAGS:---quantization=fp8 --kv_cache_dtype=fp8 --dense_batch=2048 --max_num_seqs=256}" \
                              --workload=1024-512 --num_requests=${N:-40} --rates=${RATES:-0.5,1,2}; }
step_online-low-w8-overlap() { served online-low-w8-overlap "${SERVE_FLAGS:---quantization=fp8 --kv_cache_dtype=fp8 --dense_batch=2048 --max_num_seqs=256} --overlap_dispatch" \
                              --workload=1024-512 --num_requests=${N:-40} --rates=${RATES:-0.5,1,2}; }
# Issue 28 online: multi-round chats through the server (fp8 weights and KV, a 4096-page pool that evicts live
# histories), prefix caching off, on, and on with the host tier; one server each.
export MR_FLAGS="--quantization=fp8 --kv_cache_dtype=fp8 --dense_batch=2048 --max_num_seqs=256 --num_pages=4096"
step_online-multiround-w8-off()  { served online-multiround-w8-off "${SERVE_FLAGS:-$MR_FLAGS} --enable_prefix_caching=false" \
                                     --workload=multiround --num_requests=${N:-200} --rates=${RATES:-2} --think_time_s=${THINK:-0}; }
step_online-multiround-w8-on()   { served online-multiround-w8-on "${SERVE_FLAGS:-$MR_FLAGS}" \
                                     --workload=multiround --num_requests=${N:-200} --rates=${RATES:-2} --think_time_s=${THINK:-0}; }
# The same on a pool the live conversations nearly fill (at 2 a second on 4096 pages at most ~25% was in use, so
# nothing was evicted and the host tier idled; session 26; on 1,536 pages still <= ~35%, session 27: rounds came
# at once). THINK=10 (the users' mean pause between rounds, s) keeps ~30 conversations' histories idle at once.
step_online-multiround-w8-on-small()   { served online-multiround-w8-on-small "$MR_FLAGS --num_pages=${SMALL_PAGES:-1536}" \
                                     --workload=multiround --num_requests=${N:-200} --rates=${RATES:-2} --think_time_s=${THINK:-0}; }
step_online-multiround-w8-host-small() { served online-multiround-w8-host-small "$MR_FLAGS --num_pages=${SMALL_PAGES:-1536} --host_kv_cache_gb=${HOST_GB:-32} --host_kv_copy=${HOST_KV_COPY:-thread}" \
                                     --workload=multiround --num_requests=${N:-200} --rates=${RATES:-2} --think_time_s=${THINK:-0}; }
step_online-multiround-w8-host() { served online-multiround-w8-host "${SERVE_FLAGS:-$MR_FLAGS} --host_kv_cache_gb=${HOST_GB:-32} --host_kv_copy=${HOST_KV_COPY:-thread}" \
                                     --workload=multiround --num_requests=${N:-200} --rates=${RATES:-2} --think_time_s=${THINK:-0}; }
step_tests-overlap()       { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q -s tests/gpu/test_engine_gpu.py -k dispatched_on_a_thread; }
step_tests-small-steps()  { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q -s tests/gpu/test_engine_gpu.py -k small_steps; }
step_sweep-fp8()          { $PY lab/kernel_bench.py --sweep_attention --sweep_kinds=decode --attention_backends=triton \
                              --attention_kv_dtype=fp8 --skip_gemm --out_dir="$OUT/sweep-fp8"; }
step_step-nanoflow()      { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --attn_shares=33,48,66 \
                              --out="$OUT/step-nanoflow.md"; }
step_step-overlap-trace() { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --attn_shares=66 \
                              --trace_dir="$OUT/trace-overlap" --out="$OUT/step-overlap-trace.md"; }
# The decode-overlap step traced twice: XLA's latency-hiding scheduler off (nanoflow's default on one GPU,
# compat.py) and on.
step_step-order()         { for lhs in false true; do
                              XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=$lhs" \
                              $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --attn_shares=66 \
                                --templates=decode-overlap --trace_dir="$OUT/trace-order-$lhs" --out="$OUT/step-order-lhs-$lhs.md"
                            done; }
# Decode attention variants on 33/48/66 SMs beside the gate_up GEMM on the rest: does any overlap pay?
step_beside-gemm()        { $PY lab/kernel_bench.py --beside_gemm --shares=33,48 --iters=10 --out_dir="$OUT/beside-gemm"; }
# decode-overlap with the beside-attention variants of kernel_bench --beside_gemm.
step_step-beside()        { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --attn_shares=33,48 \
                              --templates=decode-overlap --beside_attention=programs_per_sm=4 \
                              --beside_attention=prefetch_pages=1,programs_per_sm=4 --out="$OUT/step-beside.md"; }
# The same pairs under the engine's nanoflow flags (CONCURRENT command buffers, latency-hiding scheduler off):
# the auto-search's pair profile, which runs under them, saw the two chains one after the other (session 7).
step_beside-gemm-cb()     { XLA_FLAGS="$($PY -c 'import os; from nanoflow_jax import compat; compat.enable_concurrent_command_buffers(); print(os.environ["XLA_FLAGS"])')" \
                              $PY lab/kernel_bench.py --beside_gemm --shares=48 --iters=10 --out_dir="$OUT/beside-gemm-cb"; }
# The same pairs at one GPU's share of LLaMA-2-70B at TP 2, whose auto-search pairs did not overlap (session 7).
step_beside-gemm-70b()    { $PY lab/kernel_bench.py --beside_gemm --beside_shape=llama-2-70b-tp2 --shares=33,48 --iters=10 \
                              --out_dir="$OUT/beside-gemm-70b"; }
# Session 8: the decode attention with keys as the dots' rows (swap_ab: wgmma from shared memory, no padded
# query rows on the M side), alone and beside gate_up; and what one SM can read with no math at all.
step_tests-triton()       { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_kernels_gpu.py -k "triton"; }
step_sm-bandwidth()       { $PY lab/sm_bandwidth.py --shares=16,33,48,132 --out="$OUT/sm-bandwidth.md"; }
step_beside-swap-ab()     { $PY lab/kernel_bench.py --beside_gemm --shares=33,48 --iters=10 --beside_variant=swap_ab=1 \
                              --beside_variant=programs_per_sm=1 --beside_variant=swap_ab=1,programs_per_sm=1 \
                              --beside_variant=swap_ab=1,num_stages=3 --beside_variant=swap_ab=1,block_n=64,num_stages=4 \
                              --out_dir="$OUT/beside-swap-ab"; }
step_beside-swap-ab-fp8() { $PY lab/kernel_bench.py --beside_gemm --attention_kv_dtype=fp8 --shares=33,48 --iters=10 \
                              --beside_variant=swap_ab=1 --beside_variant=swap_ab=1,programs_per_sm=1 \
                              --beside_variant=swap_ab=1,num_stages=4 --out_dir="$OUT/beside-swap-ab-fp8"; }
# One CTA per SM on 33 SMs, by pipeline depth, at contexts of 1024 and 8192 (the same bytes): if the short
# key loop per work item (8 blocks at 1024) is what holds the rate per SM down, 8192 lifts it towards
# sm-bandwidth's paged figure. At 1000 (7 blocks unmasked + 1 masked, the engine's usual case) mask_all.
step_decode-context()     { for ctx in 1024 8192; do
                              $PY lab/kernel_bench.py --beside_gemm --shares=33 --iters=10 --decode_context=$ctx \
                                --beside_variant=programs_per_sm=1 --beside_variant=programs_per_sm=1,num_stages=3 \
                                --beside_variant=programs_per_sm=1,block_n=64,num_stages=4 \
                                --beside_variant=programs_per_sm=1,block_n=64,num_stages=6 \
                                --beside_variant=programs_per_sm=1,block_n=32,num_stages=8 --out_dir="$OUT/decode-context-$ctx"
                            done
                            $PY lab/kernel_bench.py --beside_gemm --shares=33 --iters=10 --decode_context=1000 \
                              --beside_variant=mask_all=1 --beside_variant=programs_per_sm=1 \
                              --beside_variant=programs_per_sm=1,mask_all=1 --out_dir="$OUT/decode-context-1000"; }
# Page ids one iteration ahead with 3+ stages: the only form whose K/V loads Triton pipelines into the dots
# (lab/triton_ir.py: every other configuration drains all copies before each block's math).
step_beside-pipelined()   { $PY lab/kernel_bench.py --beside_gemm --shares=33,48 --iters=10 \
                              --beside_variant=prefetch_pages=1,num_stages=3 --beside_variant=prefetch_pages=1,num_stages=4 \
                              --beside_variant=prefetch_pages=1,num_stages=3,programs_per_sm=1 \
                              --beside_variant=prefetch_pages=1,num_stages=4,programs_per_sm=1 \
                              --beside_variant=prefetch_pages=1,num_stages=6,block_n=64,programs_per_sm=1 \
                              --out_dir="$OUT/beside-pipelined"; }
step_beside-pipelined-fp8() { $PY lab/kernel_bench.py --beside_gemm --attention_kv_dtype=fp8 --shares=33,48 --iters=10 \
                              --beside_variant=prefetch_pages=1 --beside_variant=prefetch_pages=1,programs_per_sm=1 \
                              --beside_variant=prefetch_pages=1,num_stages=5,programs_per_sm=1 \
                              --out_dir="$OUT/beside-pipelined-fp8"; }
# Next (predictions in perf-notes, session 8): the prefill attention with its K/V loads pipelined (page ids
# one block ahead), and the decode attention pipelined with keys as the dots' rows.
step_prefill-pipelined()  { $PY lab/kernel_bench.py --sweep_attention --sweep_kinds=prefill --attention_backends=triton \
                              --sweep_variant=prefetch_pages=1 --sweep_variant=prefetch_pages=1,num_stages=4 \
                              --sweep_variant=prefetch_pages=1,block_n=128 --sweep_variant=prefetch_pages=1,mask_all=1 \
                              --sweep_variant=prefetch_pages=1,num_stages=4,mask_all=1 --out_dir="$OUT/prefill-pipelined"; }
step_beside-swap-pipelined() { $PY lab/kernel_bench.py --beside_gemm --shares=33,48 --iters=10 \
                              --beside_variant=swap_ab=1,prefetch_pages=1,num_stages=3 \
                              --beside_variant=swap_ab=1,prefetch_pages=1,num_stages=3,programs_per_sm=1 \
                              --beside_variant=swap_ab=1,prefetch_pages=1,num_stages=4,programs_per_sm=1 \
                              --beside_variant=prefetch_pages=1,num_stages=3,block_n=64 \
                              --beside_variant=swap_ab=1,prefetch_pages=1,num_stages=3,block_n=64 \
                              --beside_variant=prefetch_pages=1,num_stages=3,programs_per_sm=1,num_warps=8 \
                              --beside_variant=swap_ab=1,prefetch_pages=1,num_stages=3,programs_per_sm=1,num_warps=8 \
                              --out_dir="$OUT/beside-swap-pipelined"; }
# Key groups: a softmax state per warp's keys (4 barriers per block instead of 10, lab/triton_ir.py --ptx).
step_beside-key-groups()  { $PY lab/kernel_bench.py --beside_gemm --shares=33,48 --iters=10 \
                              --beside_variant=key_groups=4,num_stages=3,programs_per_sm=1 \
                              --beside_variant=key_groups=8,num_warps=8,num_stages=3,programs_per_sm=1 \
                              --beside_variant=key_groups=4,num_stages=4,programs_per_sm=1 \
                              --beside_variant=key_groups=4,num_stages=3,block_n=64 \
                              --out_dir="$OUT/beside-key-groups"; }
step_beside-key-groups-fp8() { $PY lab/kernel_bench.py --beside_gemm --attention_kv_dtype=fp8 --shares=33,48 --iters=10 \
                              --beside_variant=key_groups=4,programs_per_sm=1 \
                              --beside_variant=key_groups=8,num_warps=8,programs_per_sm=1 \
                              --out_dir="$OUT/beside-key-groups-fp8"; }
# The decode-overlap step with the pipelined attention variants beside the GEMMs (after beside-swap-pipelined).
step_step-beside-pipelined() { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --attn_shares=33,48 \
                              --templates=decode-overlap --beside_attention=prefetch_pages=1,num_stages=3,programs_per_sm=1 \
                              --beside_attention=swap_ab=1,prefetch_pages=1,num_stages=3,programs_per_sm=1 \
                              --beside_attention=key_groups=4,num_stages=3,programs_per_sm=1 \
                              --out="$OUT/step-beside-pipelined.md"; }
# Session 9: the SM clock and board power while gate_up and the decode attention run alone and together
# (lab/clock_probe.py): does the pair slow down because the board reaches its power limit?
step_clock-probe()        { for s in 33 66; do $PY lab/clock_probe.py --share=$s --out="$OUT/clock-probe-$s.md"; done; }
step_clock-probe-33()     { $PY lab/clock_probe.py --share=33 --out="$OUT/clock-probe-33.md"; }
# Session 10: is the 66 + 66 pair's missing overlap the attention's CTA placement (132 CTAs over every SM)?
# One CTA per SM of the share leaves the GEMM's SMs free.
step_clock-probe-66-pps1() { $PY lab/clock_probe.py --share=66 --attention_variant=programs_per_sm=1 \
                              --out="$OUT/clock-probe-66-pps1.md"; }
# The whole step's mean power against the board's limit: the most any schedule of its work can gain.
step_clock-probe-step()   { $PY lab/clock_probe.py --share=33 --step --nokernel_phases --seconds=6 \
                              --out="$OUT/clock-probe-step.md"; }
step_clock-probe-step-fp8() { $PY lab/clock_probe.py --share=33 --step --nokernel_phases --seconds=6 --kv_cache_dtype=fp8 \
                              --out="$OUT/clock-probe-step-fp8.md"; }
# The synthetic chat workloads with enough requests for a steady state: with 1000 short requests most steps
# were the tail (60 of 1606 full, session 9); 2048 sequences can fill a 2048-token step with decodes.
# Session 10: every constant-length workload and the Splitwise trace in both modes (fp8 KV cache, the best
# configuration), for #7's table: the shipped 8B config is the whole batch, so the two modes run one schedule.
# Session 13: --mode=nanoflow no longer sets the stream flags when the shipped config is the whole batch.
# The same run with them forced (the old behaviour), without them, and the sequential mode alone.
nanoflow_xla_flags() { $PY -c 'import os; from nanoflow_jax import compat; compat.enable_concurrent_command_buffers(); print(os.environ["XLA_FLAGS"])'; }
step_bench-nf-flags()     { XLA_FLAGS="$(nanoflow_xla_flags)" bench bench-nf-flags 1024-512 1000 --kv_cache_dtype=fp8 --mode=nanoflow; }
step_bench-nf-noflags()   { bench bench-nf-noflags 1024-512 1000 --kv_cache_dtype=fp8 --mode=nanoflow; }
step_bench-seq-only()     { bench bench-seq-only 1024-512 1000 --kv_cache_dtype=fp8 --mode=sequential; }
step_bench-1024-512-both()  { bench bench-1024-512-both 1024-512 1000 --kv_cache_dtype=fp8 --mode=nanoflow --compare=sequential; }
step_bench-splitwise-both() { bench bench-splitwise-both splitwise 1000 --kv_cache_dtype=fp8 --mode=nanoflow --compare=sequential; }
step_bench-512-512-both()   { bench bench-512-512-both 512-512 600 --kv_cache_dtype=fp8 --mode=nanoflow --compare=sequential; }
step_bench-512-1024-both()  { bench bench-512-1024-both 512-1024 400 --kv_cache_dtype=fp8 --mode=nanoflow --compare=sequential; }
step_bench-lmsys-8k()     { bench bench-lmsys-8k lmsys 8000 --max_num_seqs=2048; }
step_bench-sharegpt-5k()  { bench bench-sharegpt-5k sharegpt 5000 --max_num_seqs=2048; }
step_stacked-gemm()       { $PY lab/kernel_bench.py --stacked_gemm --shares=132,66 --out_dir="$OUT/stacked-gemm"; }
# decode-overlap with the prefill rows' down beside the decode attention or after it on the whole GPU.
step_step-down-whole()    { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --attn_shares=48,66 \
                              --templates=decode-overlap,decode-overlap-o+gate_up --out="$OUT/step-down-whole.md"; }
step_grouped-gemm()       { $PY lab/kernel_bench.py --grouped_gemm --out_dir="$OUT/grouped-gemm"; }
step_fused-kernels()      { $PY lab/kernel_bench.py --rope_append --rms_norm --out_dir="$OUT/fused-kernels"; }
step_tune-small-m()        { $PY lab/kernel_bench.py --tune_gemm --tune_shapes=8b-small --out_dir="$OUT/tune-small-m"; }
# Stage 1 on one GPU's shard of LLaMA-2-70B and the all-reduces across 4 (or 2) GPUs, then the search.
# Session 11: gate_up with the SiLU-and-multiply fused into the GEMM's epilogue (#5), and jax's Hopper
# attention kernel as a ceiling for prefill attention on the same tokens.
step_tests-silu-mul()     { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_kernels_gpu.py -k "silu_mul"; }
step_silu-mul()           { $PY lab/kernel_bench.py --silu_mul --shares=132,96,66 --out_dir="$OUT/silu-mul"; }
step_prefill-ceiling()    { $PY lab/kernel_bench.py --prefill_ceiling --out_dir="$OUT/prefill-ceiling"; }
step_tests-prefill-mgpu() { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q -x tests/gpu/test_kernels_gpu.py -k "prefill_attention_mgpu"; }
# Prefill attention on the Mosaic GPU kernel (the engine's on bf16 caches) against the Triton one, in the mix
# step and in a 4096-token step that is nearly all one fresh prompt.
step_step-prefill()       { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --kv_cache_dtypes=auto \
                              --triton_prefill --nanoflow=false --out="$OUT/step-prefill.md" && \
                            $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --kv_cache_dtypes=auto \
                              --decodes=8 --context=512 --prefill=4088 --triton_prefill --nanoflow=false \
                              --out="$OUT/step-prefill-4k.md"; }
step_step-fused()         { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --gemms=mosaic,mosaic_fused \
                              --kv_cache_dtypes=fp8 --nanoflow=false --out="$OUT/step-fused.md"; }
step_autosearch-tp4()     { $PY launch/autosearch.py --model=llama-2-70b --device_kind=h200 --tp=4 --out_dir="$OUT/autosearch-tp4"; }
step_autosearch-tp2()     { $PY launch/autosearch.py --model=llama-2-70b --device_kind=h200 --tp=2 --out_dir="$OUT/autosearch-tp2"; }
# The search with a decode attention variant on its shares (the best of beside-swap-pipelined); the config
# it writes carries the variant (PipelineConfig.beside_attention).
step_autosearch-pipelined() { $PY launch/autosearch.py --model=llama-3-8b --device_kind=h200 --interference --measure \
                              --beside_attention=swap_ab=1,prefetch_pages=1,num_stages=3,programs_per_sm=1 \
                              --out_dir="$OUT/autosearch-pipelined"; }
# Issue 26, item 6: the auto-search's stage 1 and 2 again with the fp8 kernels (our fp8 GEMMs on SM shares, the
# fp8-cache attention, pairs, power), then the real step both ways.
# Stage 1 compiles its ~100 kernels on threads before timing them and prints where its seconds went; its tables
# come back as *_stage1_tables.json even if the call's limit cuts the pairs or the measured step (then
# autosearch-fp8-nomeasure: the profile and the search alone).
step_autosearch-fp8()     { $PY launch/autosearch.py --model=llama-3-8b --device_kind=h200 --quantization=fp8 --interference \
                              --measure --out_dir="$OUT/autosearch-fp8"; }
step_autosearch-fp8-nomeasure() { $PY launch/autosearch.py --model=llama-3-8b --device_kind=h200 --quantization=fp8 \
                              --interference --nomeasure --out_dir="$OUT/autosearch-fp8"; }
step_autosearch()         { $PY launch/autosearch.py --model=llama-3-8b --device_kind=h200 --interference \
                              --measure --out_dir="$OUT/autosearch"; }

: "${STEP_TIMEOUT:=300}"
printf '| step | rc | seconds |\n|---|---|---|\n' > "$OUT/summary.rows"
# Session 15: where the fp8 step's time goes (kernel time by kind from a trace), and whether whole-step
# unrolling (command buffers over all 32 layers) takes the launches out of small decode steps.
step_step-fp8-mix()       { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --quantization=fp8 \
                              --kv_cache_dtypes=fp8 --nanoflow=false --iters=5 --layer_loops=scan --trace_dir="$OUT/trace-fp8-mix" \
                              --out="$OUT/step-fp8-mix.md"; }
step_step-fp8-loops()     { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --quantization=fp8 \
                              --kv_cache_dtypes=fp8 --nanoflow=false --iters=3 --layer_loops=scan --out="$OUT/step-fp8-loops.md"; }
step_step-fp8-mix-dsf()   { XLA_FLAGS="--xla_gpu_enable_dynamic_slice_fusion=true" $PY lab/step_bench.py --model=llama-3-8b \
                              --kernels=triton --quantization=fp8 --kv_cache_dtypes=fp8 --nanoflow=false --iters=5 \
                              --trace_dir="$OUT/trace-fp8-mix-dsf" --out="$OUT/step-fp8-mix-dsf.md"; }
step_step-fp8-decode()    { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --quantization=fp8 --kv_cache_dtypes=fp8 \
                              --decodes=32 --context=1024 --prefill=0 --dense_batch=2048 --max_num_seqs=1024 --nanoflow=false \
                              --layer_unrolls=32 --trace_dir="$OUT/trace-fp8-decode" --out="$OUT/step-fp8-decode.md"; }
step_step-w16-decode()    { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --kv_cache_dtypes=fp8 \
                              --decodes=32 --context=1024 --prefill=0 --dense_batch=2048 --max_num_seqs=1024 --nanoflow=false \
                              --layer_unrolls=32 --trace_dir="$OUT/trace-w16-decode" --out="$OUT/step-w16-decode.md"; }
# Issue 28: multi-round chats with prefix caching off and on (8B, fp8 KV), and the no-reuse cost on 1024/512.
step_multiround-off()     { bench multiround-off multiround 1000 --kv_cache_dtype=fp8 --enable_prefix_caching=false; }
step_multiround-on()      { bench multiround-on multiround 1000 --kv_cache_dtype=fp8; }
# Issue 28's remaining figures in one process (lab/prefix_bench.py): host-tier copy GB/s, the step with copies in
# flight, 4k-prefix TTFT hit/miss, multi-round off/on/host tier on an 8192-page pool (fp8 weights and KV).
step_prefix-bench-w8()    { $PY lab/prefix_bench.py --model=llama-3-8b --quantization=fp8 --out="$OUT/prefix-bench-w8.md" \
                              --plot_out="$OUT/prefix-bench-w8.png"; }
# The same on a pool small enough that live conversations' pages are evicted (the host tier then gives them back).
# Session 24 (issue 28): the host tier's copies without a model, 1 page a host array against blocks and the copy
# modes (seconds); the mode that slowed its stand-in step least goes to $OUT/host-copy-choice. The host-tier steps
# no longer take it: the stand-in found put and thread alike (1.05x) where the engine did not (session 27:
# multi-round 0.75x against 1.09x caching alone), so they run the engine's default, thread (HOST_KV_COPY overrides).
step_host-copies()        { $PY lab/host_copy_bench.py --choice_out="$OUT/host-copy-choice" 2>&1 | grep -v "^W" | tee "$OUT/host-copies.md" | grep -E "^\||Error|chosen|One block"; }
# Session 29: the sampler's modes by rows sampled (greedy, a draw, top_p and top_k's vocabulary sort, logprobs,
# penalties) against the logits' read floor; no model. Whether the sort (every step with one top_p row) costs enough
# to replace.
step_sampler-cost()       { $PY lab/sampler_bench.py --rows=1,64,512,1024 --search_bits=2,8 --out="$OUT/sampler-cost.md" 2>&1 | grep -v "^W"; }
# Session 28: the tier's warm-up fill of its pinned pool (24 GB), twice, in a process that reserved the pool at start
# and in one that did not. Predicted: reserved ~1 s both times (the copies alone); not reserved 4-10 s the first
# time (pinning: session 27's online stalls) and ~1 s the second (XLA's allocator kept the regions). The RSS line
# says whether jax 0.11.2's XLA reserved it (~+40 GB before the fill).
step_fill-probe()         { for gb in 32 0; do $PY lab/host_copy_bench.py --block_pages= --put_probe=false --fill_probe_gb=${FILL_GB:-24} \
                              --host_pool_gb=$gb 2>&1 | grep -v "^W" | tee -a "$OUT/fill-probe.md" | grep -E "Host pool|RSS|Error"; done; }
step_prefix-bench-w8-4k() { $PY lab/prefix_bench.py --model=llama-3-8b --quantization=fp8 --num_pages=4096 --configs=${CONFIGS:-off,on,host} --parts=${PARTS:-copies,step,ttft,multiround} \
                              --host_kv_copy="${HOST_KV_COPY:-thread}" --out="$OUT/prefix-bench-w8-4k.md" --plot_out="$OUT/prefix-bench-w8-4k.png"; }
step_bench-1024-512-w8-nocache() { bench bench-1024-512-w8-nocache 1024-512 1000 --kv_cache_dtype=fp8 --quantization=fp8 \
                              --enable_prefix_caching=false; }
step_bench-1024-512-nocache() { bench bench-1024-512-nocache 1024-512 1000 --kv_cache_dtype=fp8 --enable_prefix_caching=false; }
sweep() { local name=$1; shift; $PY launch/benchmark.py --model=llama-3-8b --random_weights --dense_batch=2048 \
            --max_num_seqs=1024 --kv_cache_dtype=fp8 --decode_sweep=1,8,32,128,512 --json_out="$OUT/$name.json" \
            --plot_out="$OUT/$name.png" --plain_baseline "$@"; }   # (+ the plain JAX step, same run)
step_decode-sweep-w16()   { sweep decode-sweep-w16; }
step_decode-sweep-w16-unrolled() { sweep decode-sweep-w16-unrolled --layer_loop=unrolled; }
step_decode-sweep-w8()    { sweep decode-sweep-w8 --quantization=fp8; }
# Issue 27 (session 23): the small decode steps as one command buffer. lab/gpu_aot.py's census (XLA compiling for an
# H200 on the CPU) finds each jax-triton call launched alone (XLA records legacy custom calls in no command buffer:
# its flag for them is gone), so the default fp8 batch-1 step is 66 host launches (34 graphs), and the Pallas
# small-step attention (which XLA compiles itself) makes it one graph. One process, one load, batch 1/8/32: the
# default (flash-decoding on since session 24; session 23 ran it as a variant), without it, the graph
# (small_step_attention), the graph + flash-decoding, and that with each GEMM op as one Pallas kernel (small_gemm:
# 349 graph nodes instead of 666); then the plain JAX step. No TTFT here: each variant would compile the 128-token bucket once more (~15 s cold). ~450 s. Predictions in
# docs/history/perf-notes.md (session 23).
step_decode-cb()          { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_kernels_gpu.py \
                              -k "pallas_attention_with_key_splits or small_gemm_fp8_pallas" \
                              || return 1
                            $PY launch/benchmark.py --model=llama-3-8b --random_weights --dense_batch=512 --max_num_seqs=64 \
                              --kv_cache_dtype=fp8 --quantization=fp8 --decode_sweep=1,8,32 --ttft_prompts= \
                              --decode_variants=nosplit:split_decode_keys=false --decode_variants=graph:small_step_attention=64 \
                              --decode_variants=graph-split:small_step_attention=64,split_decode_keys=true \
                              --decode_variants=graph-split-gemm:small_step_attention=64,split_decode_keys=true,small_gemm=true \
                              --plain_baseline \
                              --json_out="$OUT/decode-cb.json" --plot_out="$OUT/decode-cb.png" 2>&1 \
                              | grep --line-buffered -v "^W" | tee -a "$OUT/decode-cb.md" | grep --line-buffered -E "^\||decode|Error"; }
# Issue 27: the small decode steps with and without a dispatch thread (--overlap_dispatch), fp8 weights and KV,
# with flash-decoding (session 23: the faster small step on an H100; its host dispatch, 2.5-3.5 ms, is what the
# thread would hide); one process, one load (--compare=overlap).
step_decode-overlap()     { $PY launch/benchmark.py --model=llama-3-8b --random_weights --dense_batch=512 \
                              --max_num_seqs=64 --kv_cache_dtype=fp8 --quantization=fp8 --decode_sweep=1,8,32 --split_decode_keys \
                              --compare=overlap --json_out="$OUT/decode-overlap.json" --plot_out="$OUT/decode-overlap.png"; }
# Issue 27's bf16 targets (batch 1 <= 1.2x the floor, ~4.2 ms; TPOT <= 5 ms), one process: the default (scanned
# layers), the layers unrolled, unrolled as one graph with flash-decoding (census: 506 kernels in one command
# buffer, the plain JAX step 747), then the plain JAX step.
step_decode-cb-w16()      { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_kernels_gpu.py -k small_gemm_bf16 || return 1
                            $PY launch/benchmark.py --model=llama-3-8b --random_weights --dense_batch=512 --max_num_seqs=64 \
                              --kv_cache_dtype=fp8 --decode_sweep=1,8,32 --ttft_prompts=128 --layer_loop=scan \
                              --decode_variants=unrolled:layer_loop=unrolled \
                              --decode_variants=graph-split:layer_loop=unrolled,small_step_attention=64,split_decode_keys=true \
                              --decode_variants=graph-split-gemm:layer_loop=unrolled,small_step_attention=64,split_decode_keys=true,small_gemm=true \
                              --plain_baseline --json_out="$OUT/decode-cb-w16.json" --plot_out="$OUT/decode-cb-w16.png" 2>&1 \
                              | grep --line-buffered -v "^W" | tee -a "$OUT/decode-cb-w16.md" | grep --line-buffered -E "^\||decode|Error"; }
# Issue 27: where the batch-1 fp8 decode step's 6.24 ms go (floor 1.90 ms): one sequence at context 1024, traced
# (kernel time by kind, the device's idle time between them, the step's span).
step_step-fp8-decode1()   { $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --quantization=fp8 --kv_cache_dtypes=fp8 \
                              --decodes=1 --context=1024 --prefill=0 --max_num_seqs=64 --dense_batch=2048 --nanoflow=false \
                              --iters=20 --trace_dir="$OUT/trace-fp8-decode1" --out="$OUT/step-fp8-decode1.md"; }
# Where the fp8 load's ~60 s go (quantize_stacked at 0.2 GB/s on the H200): quantize_weight's parts timed alone.
# Session 21: the fp8 MLP's middle as one Triton kernel (fp8_gemm=xla_fused) against XLA's two passes (3.3 ms of
# the 43.6 ms mix step): the kernel test, then the mix step and batch 1 timed both ways in one process each.
step_fused-quant()        { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_kernels_gpu.py -k "silu_mul_quant or rms_norm_quant" && \
                            $PY lab/step_bench.py --model=llama-3-8b --kernels=triton --quantization=fp8 --kv_cache_dtypes=fp8 \
                              --nanoflow=false --iters=10 --fp8_gemms=xla_fused --fused_rope_append \
                              --trace_dir="$OUT/trace-fused-quant" --out="$OUT/fused-quant.md"; }
step_quantize-probe()     { for w in gate_up o; do $PY lab/quantize_probe.py --weight=$w --layers=4 | tee -a "$OUT/quantize-probe.md"; done; }
# session 21: the parts were fast at 4 layers (quantize_weight under vmap 677 GB/s) where the load ran at 0.3 GB/s;
# so 32 layers, the engine's process settings, and the loader's own path on the 8B shape
# Session 21's fix (quantize_stacked layer by layer, compiled without autotuning): the loader's path on the 8B
# shape, predicted under 10 s (was 55-65 s)
# decode_off_on NAME FLAG [BENCH FLAGS...]: the small decode steps (512-row dense batch, 64 slots, fp8 KV) through
# benchmark.py's decode sweep without and then with --FLAG, one process each; the tables to NAME.md.
decode_off_on() { local name=$1 flag=$2; shift 2
                  for v in off on; do
                    echo "== $flag $v"
                    $PY launch/benchmark.py --model=llama-3-8b --random_weights --dense_batch=512 --max_num_seqs=64 \
                      --kv_cache_dtype=fp8 "$@" $([[ $v == on ]] && echo "--$flag") \
                      --json_out="$OUT/$name-$v.json" 2>&1 | grep -v "^W" | tail -12
                  done | tee -a "$OUT/$name.md"; }
# Session 24: split_decode_keys (flash-decoding, now the default) on bf16 weights, layers unrolled (the scanned
# bf16 step is host-bound: its layer loop is a while loop the host drives), one process: split, then not.
step_decode-split()       { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_kernels_gpu.py -k "key_splits" || return 1
                            $PY launch/benchmark.py --model=llama-3-8b --random_weights --dense_batch=512 --max_num_seqs=64 \
                              --kv_cache_dtype=fp8 --decode_sweep=1,8,32 --layer_loop=unrolled \
                              --decode_variants=nosplit:split_decode_keys=false --json_out="$OUT/decode-split.json" 2>&1 \
                              | grep -v "^W" | tee -a "$OUT/decode-split.md" | grep -E "^\||decode|Error"; }
# Session 30 (issue 27): bf16 small steps with the hybrid layer loop (unrolled over traced slices of the stacks),
# scanned as the control, then the plain JAX step, one process: batch 1 / 8 / 32. Predicted hybrid within 3% of
# session 29's unrolled 6.31 / 6.51 / 7.54 ms (H100); scanned ~10 ms.
step_decode-hybrid-w16()  { $PY launch/benchmark.py --model=llama-3-8b --random_weights --dense_batch=512 --max_num_seqs=64 \
                              --kv_cache_dtype=fp8 --decode_sweep=1,8,32 --layer_loop=hybrid \
                              --decode_variants=scan:layer_loop=scan --plain_baseline \
                              --json_out="$OUT/decode-hybrid-w16.json" 2>&1 \
                              | grep -v "^W" | tee -a "$OUT/decode-hybrid-w16.md" | grep -E "^\||decode|Error"; }
# Session 22 (issue 27): small steps with each fp8 GEMM's whole op as one kernel (--small_gemm), fp8 weights and
# KV, batch 1/8/16, off then on; its GPU kernel test first.
step_decode-small-gemm()  { NANOFLOW_GPU_TESTS=1 $PY -m pytest -q tests/gpu/test_kernels_gpu.py -k small_gemm_fp8 || return 1
                            decode_off_on decode-small-gemm small_gemm --quantization=fp8 --decode_sweep=1,8,16 \
                              --ttft_prompts=128; }
# Session 22: XLA's KV-append scatter with and without unique_indices (atomics), bf16 and fp8 caches, and the
# fused Triton RoPE + append; predicted: the unique scatter several times faster on the fp8 cache.
step_kv-scatter()         { $PY lab/kernel_bench.py --rope_append --iters=50 --out_dir="$OUT/kv-scatter"; }
step_quantize-load()      { $PY lab/quantize_probe.py --full_model 2>&1 | grep --line-buffered -v "^W\|tpu" \
                              | tee -a "$OUT/quantize-load.md"; }
step_quantize-ctx()       { { $PY lab/quantize_probe.py --weight=o --layers=4 --iters=1 --engine_env
                              $PY lab/quantize_probe.py --weight=o --layers=32 --iters=1
                              $PY lab/quantize_probe.py --weight=o --layers=32 --iters=1 --engine_env; } 2>&1 \
                              | grep --line-buffered -v "^W\|tpu" | tee -a "$OUT/quantize-ctx.md"; }
step_decode-sweep-w8-scan() { sweep decode-sweep-w8-scan --quantization=fp8 --layer_loop=scan; }

for spec in "$@"; do
  name=${spec%%:*}; limit=$STEP_TIMEOUT
  [[ $spec == *:* ]] && limit=${spec#*:}
  if ! declare -F "step_$name" > /dev/null; then echo "unknown step $name" >&2; exit 2; fi
  start=$(date +%s)
  # The function runs in a subshell so that `timeout` can stop it and all it started.
  timeout --kill-after=10 "$limit" bash -c "$(declare -f run_bench bench bench70 served sweep fp8_sweep decode_off_on nanoflow_xla_flags "step_$name"); PY=$PY OUT=$OUT step_$name" \
    > "$OUT/$name.log" 2>&1
  rc=$?
  printf '| %s | %s | %s |\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$OUT/summary.rows"
  tail -n 25 "$OUT/$name.log"
done
mv "$OUT/summary.rows" "$OUT/summary.md"
tar czf /tmp/xla_autotune.tgz -C "$AUTOTUNE_DIR" . && echo "autotune cache: $(find "$AUTOTUNE_DIR" -type f | wc -l) results, $(du -k /tmp/xla_autotune.tgz | cut -f1) KB packed"
# The device tool brings back at most 8 files: raw profiler traces stay behind (their summaries are in the
# logs) and the rest travels as one archive beside the summary.
if [[ ${PACK:-1} == 1 ]]; then
  rm -rf "$OUT"/trace-* "$OUT"/*/trace
  tar czf /tmp/gpu_steps_results.tgz -C "$OUT" --exclude=summary.md . && \
    find "$OUT" -mindepth 1 ! -name summary.md -delete && mv /tmp/gpu_steps_results.tgz "$OUT/results.tgz"
fi
mv /tmp/xla_autotune.tgz "$OUT/xla_autotune.tgz"
cat "$OUT/summary.md"
