#!/bin/bash
# Reproduces every figure of REPORT.md (about 15 minutes on the 2-core machine; run it idle:
# with another process on a core, 2-thread OpenMP runs stall in ~8 ms scheduler quanta).
# THREADS=1 is what the report's tables used (the machine was shared); THREADS=2 for the real target.
set -e
cd "$(dirname "$0")"
PY=../../.venv/bin/python
T=${THREADS:-1}
mkdir -p results
THREADS=$T $PY test_vnni.py                                            # builds q4vnni.cpp (~40 s), checks it
THREADS=$T $PY bench_kernels.py --kernels fp32,bf16,int4pack_bf16,int8pack_bf16,fbgemm_dyn,int_mm+quant,int_mm_kernel,vnni_q4_1/q8_0 --target 0.03
mv results/kernels.jsonl results/kernels_${T}thread.jsonl
THREADS=$T $PY bench_kernels.py --kernels int4pack_fp32,dyn_quant_4bit,x86_dyn,onednn_dyn,fp16_dyn,onednn_qlinear,vnni_op --shapes "k/v,gate/up" --ms 1,16 --target 0.02
mv results/kernels.jsonl results/kernels_${T}thread_extra.jsonl
THREADS=$T $PY chain.py --target 0.3
mv results/chain.jsonl results/chain_${T}thread.jsonl
THREADS=$T $PY layer.py --ms 1 --configs "fp32,bf16 e2e,int4pack bf16 + casts (today),fbgemm_dyn,int_mm+quant,vnni,vnni_op,noop fp32,noop bf16"
THREADS=$T $PY layer.py --ms 1 --configs none --whole "int_mm+quant"
THREADS=$T $PY layer.py --ms 1 --configs none --whole "vnni_op"
THREADS=$T $PY profile_rest.py > results/profile_rest.txt
THREADS=$T $PY attn_alt.py
THREADS=$T $PY accuracy.py --tokens 256
KFILE=kernels_${T}thread.jsonl CFILE=chain_${T}thread.jsonl $PY tables.py > results/tables.md
THREADS=$T $PY gemv_compiled.py
