#!/usr/bin/env bash
# One device call that checks before it measures (device minutes are few; see docs/notes.md):
#   bash benchmarks/gpu_check.sh [tests] [grpo] [grpoab] [train] [train120b] [sweep] [wordsweep] [readroof] [tiled] [fixup] [prefill] [fp32dump] [pdl] [gemv] [defer] [rotary] [trainsweep] [decode] [logsoftmax] [regress] [flexprobe] [flextune] [combine] [launches] [trainab] [steptimes] [hostprof] [graphprobe] [dense] [grpocapture] [attnprobe] [varlenab] [profcaptured] [densesweep] [launchtimes] [cudnnprobe] [generate]   # default: tests grpo
# tests: every test marked gpu; grpo: benchmarks/grpo_step.py (2 steps); grpoab: 3 steps without and
# with the paths (fused log-softmax, sink kernels, shared prefixes) whose tests passed in FIRST_K; train: benchmarks/train.py
# at 1K/4K/8K (auto and fully checkpointed) against transformers + PEFT at 4K/8K; train120b: a
# gpt-oss-120b-shaped LoRA step at 1K and 16K tokens with an AdamW step, its states offloaded to
# the CPU and (the baseline, in a second process) on the GPU; sweep: the MXFP4
# decode-size tile sweep of benchmarks/moe.py; wordsweep: its folded word tiles with the scales one
# and two K tiles ahead; readroof: the decode sizes' routed bytes read with no arithmetic (the decode's
# tiles, contiguous spans) against the decode kernels; fixup: rollouts and decode-step profiles with split-K
# tiles finishing in a second launch, then in their last part; prefill: benchmarks/profile_prefill.py at 64
# prompts, then 1 and 64 (FlexAttention compiled as torch does by default, then per shape); pdl: benchmarks/pdl_probe.py (programmatic dependent launch on MoE-sized products); gemv: benchmarks/moe.py --gemv; defer: rollouts and decode-step profiles with each layer's MLP output added in its own launch, then
# by the next layer's norm kernel; rotary: the same with rotary and the KV append in two launches, then one; trainsweep: its training-size sweep; decode: benchmarks/profile_decode.py --lora (rollout
# copies against a cast per forward, and the MoE decode tiles with registers capped at 80), with
# FOLD=1 again without the folded word decode, and (after sweep) with the sweep's fastest tiles; logsoftmax: the fused
# log-softmax's GPU test and a 4K training step profiled without and with it (and with the sink
# kernels too); regress: rollouts on the defaults, in session 13's configuration, without the
# deferred add and with static FlexAttention; flexprobe: benchmarks/flex_probe.py per compile mode; flextune:
# benchmarks/flex_tune.py (FlexAttention tile options, training shape); combine: COMBINE_PARTS's GPU
# test, then rollouts and decode profiles without and with it, then without one-split decode attention;
# launches: both cuts (defaults since session 19) in one call, profiles three ways in one process (the
# defaults, without the one-split rule, without either), batch-64 rollouts without either and on the
# defaults; trainab: the eager log-prob gradient's GPU test and 4K/8K steps without it and the fused
# q, k, v, without the fused q, k, v, and on the defaults, timed in turn in one process; steptimes:
# benchmarks/step_times.py (every step's time over 8K, 4K, 8K, a step of each profiled) with the host's
# threads as they are, with one, and with inductor compiling in-process (session 19's slow start);
# hostprof: step_times.py --host-profile at 1K and 4K (cProfile of a step, its host-device syncs, host
# and GPU-tail time of every step); graphprobe: benchmarks/graph_probe.py (a whole LoRA step captured in one
# CUDA graph and replayed, against the eager step, at 1K/4K/8K);
# dense: the kept bf16 expert copies' GPU test and train.py --dense-ab; grpocapture: grpo_step.py (3 steps)
# without, then with, capture_training; attnprobe: benchmarks/attn_probe.py (sink attention by
# FlexAttention and by FlashAttention-2 varlen, 4K/8K); varlenab: train.py --interleave 4K/8K steps without, then
# with, VARLEN_ATTENTION (40 GB of kept expert copies), eager and then replayed from CUDA graphs; profcaptured:
# profile_train.py --captured at 4K, FlexAttention then varlen; densesweep: moe.py --dense-train-sweep (bf16
# experts' tiles at 4K / 8K tokens); cudnnprobe: benchmarks/cudnn_probe.py (cuDNN's varlen attention
# against FlashAttention-2's, for the full layers); launchtimes: moe.py --launch-times (each training launch of the
# bf16 experts alone per tile, 4K / 8K); generate: benchmarks/generate.py. Logs and JSON go
# to $OUT (the device tool's folder) or /tmp/gpu_check.
set -o pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
what=" ${*:-tests grpo} "
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
if [[ $what == *" tests "* ]]; then
    # -v: each test's name and result as it ends (a run cut by its limit still says which failed);
    # the files whose code changed most recently first. The whole set takes over 5 minutes (session
    # 5: 29 tests in 300 s, torch.compile of FlexAttention and Triton compiles dominate; session 6:
    # test_moe_gpu.py + test_engine_gpu.py alone, 69 tests, 210 s on an H100).
    # TEST_FILES (optional) names a subset, e.g. leaving out files whose code has not changed since they passed.
    # Session 20 (H100): the whole set needs about 1,000 s, more than one call's 600: engine + train
    # files with the first 45 MoE tests took 540 s; the rest of moe + fused + fsdp 228 s; attention
    # about 250 s. So three calls: TEST_FILES="tests/test_engine_gpu.py tests/test_train_gpu.py",
    # then "tests/test_moe_gpu.py tests/test_fused_gpu.py tests/test_fsdp_gpu.py", then
    # "tests/test_attention_gpu.py" (TESTS_TIMEOUT=540 each).
    files=${TEST_FILES:-"tests/test_engine_gpu.py tests/test_train_gpu.py tests/test_moe_gpu.py tests/test_fsdp_gpu.py
        tests/test_fused_gpu.py tests/test_attention_gpu.py"}
    # FIRST_K (optional): a pytest -k expression run first across FIRST_FILES (default: the same
    # files), within FIRST_TIMEOUT; the rest of $files follows without it. Its log is also kept in
    # /tmp on the device, where a later call on the same warm machine (grpoab) reads it.
    if [[ -n ${FIRST_K:-} ]]; then
        timeout ${FIRST_TIMEOUT:-200} python -m pytest -m gpu -v -p no:cacheprovider -rfE -k "$FIRST_K" \
            ${FIRST_FILES:-$files} 2>&1 | tee "$out/gpu_tests_first.log" \
            | grep -E "PASSED|FAILED|ERROR|Error|assert|passed|failed" | tail -40
        cp "$out/gpu_tests_first.log" /tmp/ossrl_gpu_tests_first.log
        deselect=(-k "not ($FIRST_K)")
    fi
    # TEST_K (optional, without FIRST_K): a pytest -k expression for the run, e.g. "engine or fixup"
    [[ -n ${TEST_K:-} && -z ${FIRST_K:-} ]] && deselect=(-k "$TEST_K")
    timeout ${TESTS_TIMEOUT:-300} python -m pytest -m gpu -v -p no:cacheprovider --durations=15 -rfE \
        "${deselect[@]}" $files 2>&1 | tee "$out/gpu_tests.log" \
        | grep -E "PASSED|FAILED|ERROR|Error|assert|passed|failed" | tail -80
fi
# ab_rollouts SWITCH [profile]: rollouts (generate.py, ossrl only) with --no-SWITCH, then --SWITCH; with
# "profile", each followed by the decode-step profile (profile_decode.py reads the same flag).
ab_rollouts() {
    for flag in --no-$1 --$1; do
        timeout ${GEN_TIMEOUT:-120} python benchmarks/generate.py --skip-hf --shapes ${GEN_SHAPES:-batch1,batch64,grpo_8x8} \
            $flag --out "$out/generate$flag.json" 2>&1 | tee "$out/generate$flag.log" \
            | grep -oE '"name": "[a-z0-9_]+"|"tokens_per_second": [0-9.]+|"prefill_seconds": [0-9.]+'
        if [[ ${2:-} == profile ]]; then
            timeout 100 python benchmarks/profile_decode.py $flag > "$out/profile_decode$flag.txt" 2>&1
            grep -E "graph replay|CUDA time" "$out/profile_decode$flag.txt"
        fi
    done
}
# passed NAME: the first tests' run finished (its summary line is there: a run cut by its limit may
# have left some of NAME's parameters unrun) and every result line of test NAME in it passed.
passed() {
    local log=${FIRST_LOG:-/tmp/ossrl_gpu_tests_first.log}
    grep -qE "^=+ .*[0-9]+ (passed|failed)" "$log" 2>/dev/null && grep -q "$1.*PASSED" "$log" \
        && ! grep -qE "$1.*(FAILED|ERROR)" "$log"
}
if [[ $what == *" grpoab "* ]]; then
    # The GRPO step without and then with the session-10 paths whose GPU tests passed (FIRST_K run).
    # (every path named either way: the library's defaults are on since session 11)
    flags="" on=0
    for pair in test_fused_log_softmax_equals:fused-log-softmax test_sink_rescale_kernels:sink-kernels \
        test_shared_prefixes_give:share-prefixes; do
        if passed "${pair%%:*}"; then flags+=" --${pair#*:}"; on=1; else flags+=" --no-${pair#*:}"; fi
    done
    echo "grpoab: paths on where their tests passed:$flags"
    timeout ${GRPO_TIMEOUT:-200} python benchmarks/grpo_step.py --steps 3 --no-fused-log-softmax --no-sink-kernels \
        --no-share-prefixes --out "$out/grpo_step.json" 2>&1 \
        | tee "$out/grpo_step.log" | tail -4
    if (( on )); then
        timeout ${GRPO_TIMEOUT:-200} python benchmarks/grpo_step.py --steps 3 $flags --out "$out/grpo_step_flags.json" 2>&1 \
            | tee "$out/grpo_step_flags.log" | tail -4
    fi
fi
if [[ $what == *" grpo "* ]]; then
    # GRPO_ARGS (optional), e.g. "--steps 3 --profile-train" (the last step's training phase profiled)
    timeout ${GRPO_TIMEOUT:-240} python benchmarks/grpo_step.py --steps 2 ${GRPO_ARGS:-} --out "$out/grpo_step.json" 2>&1 | tee "$out/grpo_step.log" | tail -8
fi
if [[ $what == *" grpocapture "* ]]; then
    # the GRPO step without, then with, its micro-batches replayed from CUDA graphs (capture_training)
    for flag in "" --capture-training; do
        timeout ${GRPO_TIMEOUT:-200} python benchmarks/grpo_step.py --steps 3 $flag ${GRPO_ARGS:-} \
            --out "$out/grpo_step${flag:+_captured}.json" 2>&1 | tee "$out/grpo_step${flag:+_captured}.log" | tail -4
    done
fi
if [[ $what == *" train "* ]]; then
    # TRAIN_ARGS (optional), e.g. "--flex-static --skip-hf"
    timeout 400 python benchmarks/train.py --tokens 1024,4096,8192 --hf-tokens 4096,8192 \
        --full-checkpoint-tokens 4096 ${TRAIN_ARGS:-} --out "$out/train.json" 2>&1 | tee "$out/train.log" | tail -20
fi
if [[ $what == *" train120b "* ]]; then
    for optimizer in ${OPTIMIZERS:-offloaded adamw}; do
        timeout 200 python benchmarks/train.py --model 120b --tokens 1024,16384 --repeats 1 --full-checkpoint-tokens "" \
            --optimizer $optimizer --out "$out/train_120b_$optimizer.json" 2>&1 | tee "$out/train_120b_$optimizer.log" | tail -4
    done
fi
if [[ $what == *" sweep "* ]]; then
    timeout ${SWEEP_TIMEOUT:-300} python benchmarks/moe.py --decode-sweep --out "$out/moe_decode_sweep_split.json" 2>&1 \
        | tee "$out/moe_sweep.log" | grep -v "^decode_sweep" | tail -20
fi
if [[ $what == *" wordsweep "* ]]; then  # the folded word tiles, scales one and two K tiles ahead (session 10)
    timeout ${SWEEP_TIMEOUT:-300} python benchmarks/moe.py --decode-sweep --decode-grid words \
        --out "$out/moe_decode_sweep_ahead.json" 2>&1 | tee "$out/moe_wordsweep.log" | grep -v "^decode_sweep" | tail -20
fi
if [[ $what == *" readroof "* ]]; then  # the MoE decode's read ceiling (session 11): the routed bytes read with no math
    timeout ${SWEEP_TIMEOUT:-200} python benchmarks/moe.py --read-roofline --out "$out/moe_read_roofline.json" 2>&1 \
        | tee "$out/moe_read_roofline.log" | tail -25
fi
if [[ $what == *" tiled "* ]]; then  # session 12: the decode sizes with the MXFP4 blocks tile-contiguous, then rollouts without and with the copies
    timeout ${SWEEP_TIMEOUT:-200} python benchmarks/moe.py --tiled --out "$out/moe_tiled.json" 2>&1 \
        | tee "$out/moe_tiled.log" | grep -E "'default': True|layout': \(64, (8|16)\)" | tail -30
    ab_rollouts tile-experts
fi
if [[ $what == *" fixup "* ]]; then  # session 13: split-K tiles finishing in their last part, against a second launch
    ab_rollouts split-k-fixup profile
fi
if [[ $what == *" prefill "* ]]; then  # session 13: a prefill's kernels and host time, 1 and 64 prompts of 128 tokens
    # 64 prompts alone (one sequence length: FlexAttention compiled for it), then after 1 prompt in
    # the same process with torch's default compile (symbolic lengths from the second shape on) and
    # compiled per shape (--flex-static). Session 14: FlexAttention 1.79 ms a call after 1 prompt,
    # against session 13's 0.22 with 64 alone.
    timeout 100 python benchmarks/profile_prefill.py --prompts 64 > "$out/profile_prefill_64.txt" 2>&1
    grep -E "^prefill of|Error" "$out/profile_prefill_64.txt"
    for flag in --no-flex-static --flex-static; do
        timeout 150 python benchmarks/profile_prefill.py --prompts 1 64 $flag > "$out/profile_prefill_1_64$flag.txt" 2>&1
        grep -E "^prefill of|Error" "$out/profile_prefill_1_64$flag.txt"
    done
fi
if [[ $what == *" fp32dump "* ]]; then  # session 15: the fp32 shared-prefix engine test that ran past its limits, with a stack dump at 95 s
    timeout 110 python -c "import faulthandler, sys; faulthandler.dump_traceback_later(95, exit=True); import pytest
sys.exit(pytest.main(['-m', 'gpu', '-v', '-p', 'no:cacheprovider', '-k', 'shared_prefixes_give and (dtype0 or float32)',
                      'tests/test_engine_gpu.py']))" > "$out/fp32dump.log" 2>&1
    grep -E "PASSED|FAILED|passed|failed|Timeout" "$out/fp32dump.log"; grep -E '^  File' "$out/fp32dump.log" | head -30
fi
if [[ $what == *" pdl "* ]]; then  # session 14: chains of batch-1 MoE-sized products, plain launches against PDL
    timeout 120 python benchmarks/pdl_probe.py --out "$out/pdl_probe.json" 2>&1 | tee "$out/pdl_probe.log" | tail -12
fi
if [[ $what == *" gemv "* ]]; then  # session 14: the MoE layer at 1 and 2 tokens as CUDA-core GEMVs against the tile
    timeout 120 python benchmarks/moe.py --gemv --out "$out/moe_gemv.json" 2>&1 | tee "$out/moe_gemv.log" | grep -E "^gemv"
fi
if [[ $what == *" defer "* ]]; then  # session 13: each layer's MLP output added by the next norm kernel, or in its own launch
    ab_rollouts defer-residual-add profile
fi
if [[ $what == *" rotary "* ]]; then  # session 14: rotary and the KV append in one launch, or two
    ab_rollouts rotary-append profile
fi
if [[ $what == *" trainsweep "* ]]; then  # MXFP4 at training sizes: the copy, the packed decode, the word decode
    timeout ${SWEEP_TIMEOUT:-400} python benchmarks/moe.py --train-sweep --out "$out/moe_train_sweep.json" 2>&1 \
        | tee "$out/moe_train_sweep.log" | grep -v "^train_sweep" | tail -20
fi
if [[ $what == *" decode "* ]]; then  # decode steps (batch 1, 64) with LoRA: copies vs cast; the sweep's tiles
    timeout 260 python benchmarks/profile_decode.py --lora --maxnreg 80 2>&1 \
        | tee "$out/profile_decode_lora.log" \
        | grep -E "graph replay|CUDA time"
    if [[ -n ${FOLD:-} ]]; then  # FOLD=1: again with two multiplies a pair (no fold, the default before session 9)
        timeout 200 python benchmarks/profile_decode.py --lora --no-fold 2>&1 | tee "$out/profile_decode_nofold.log" \
            | grep -E "graph replay|CUDA time"
    fi
    if [[ -f $out/moe_decode_sweep_split.json ]]; then
        timeout 150 python benchmarks/profile_decode.py --moe-sweep "$out/moe_decode_sweep_split.json" 2>&1 \
            | tee "$out/profile_decode_picked.log" | grep -E "graph replay|CUDA time|tiles"
    fi
fi
if [[ $what == *" logsoftmax "* ]]; then  # the fused log-softmax (session 9; on since session 11): its GPU test, then a 4K step both ways
    timeout 200 python -m pytest -m gpu -q -p no:cacheprovider -k fused_log_softmax tests/test_train_gpu.py 2>&1 \
        | tee "$out/logsoftmax_test.log" | tail -3
    for flag in "--no-fused-log-softmax --no-sink-kernels" "--fused-log-softmax --no-sink-kernels" \
        "--fused-log-softmax --sink-kernels"; do
        timeout 150 python benchmarks/profile_train.py --tokens 4096 $flag 2>&1 | tee -a "$out/logsoftmax_profile.log" | head -12
    done
fi
if [[ $what == *" regress "* ]]; then  # session 16: rollouts on the defaults, then in session 13's configuration
    # (the switches added or turned on since its 7,877 tok/s at batch 64, all off), without the deferred
    # add, and with FlexAttention compiled per length (is batch 64's prefill slow after batch 1's?)
    run=0
    for args in "" "--no-host-masks --no-router-groups --no-rotary-append --no-defer-residual-add" \
        "--no-defer-residual-add" "--flex-static"; do
        echo "rollouts ${args:-(defaults)}"
        run=$((run + 1))
        timeout ${GEN_TIMEOUT:-110} python benchmarks/generate.py --skip-hf --shapes ${GEN_SHAPES:-batch1,batch64} $args \
            --out "$out/generate_regress_$run.json" 2>&1 | tee -a "$out/generate_regress.log" \
            | grep -oE '"name": "[a-z0-9_]+"|"tokens_per_second": [0-9.]+|"prefill_seconds": [0-9.]+' | paste -sd' '
    done
fi
if [[ $what == *" flexprobe "* ]]; then  # session 16: FlexAttention on a 64 x 128 packed mask, per compile mode
    for mode in static auto dynamic; do
        timeout ${FLEXPROBE_TIMEOUT:-60} python benchmarks/flex_probe.py $mode 2>&1 | tee "$out/flex_probe_$mode.txt" | grep -E "ms a call|Error"
    done
fi
if [[ $what == *" combine "* ]]; then  # session 17: split-K down partials summed by the k-sum (one launch fewer)
    timeout 60 python -m pytest -m gpu -q -p no:cacheprovider -rfE -k combine_parts tests/test_moe_gpu.py 2>&1 \
        | tee "$out/combine_test.log" | tail -2
    GEN_SHAPES=${GEN_SHAPES:-batch8,batch64} ab_rollouts combine-parts profile
    # decode attention without the one-split rule (two splits and a combine launch where the rule asks for
    # them; the rule, up to 2,048 rows, is the default since session 19 and serves both arms above)
    timeout ${GEN_TIMEOUT:-120} python benchmarks/generate.py --skip-hf --shapes ${GEN_SHAPES:-batch8,batch64} \
        --one-split-max-capacity 0 --out "$out/generate_one_split.json" 2>&1 | tee "$out/generate_one_split.log" \
        | grep -oE '"name": "[a-z0-9_]+"|"tokens_per_second": [0-9.]+|"prefill_seconds": [0-9.]+' | paste -sd' '
    timeout 100 python benchmarks/profile_decode.py --one-split-max-capacity 0 > "$out/profile_decode_one_split.txt" 2>&1
    grep -E "graph replay|CUDA time" "$out/profile_decode_one_split.txt"
fi
if [[ $what == *" launches "* ]]; then  # session 18: the two launch cuts (COMBINE_PARTS, one-split decode
    # attention; both on by default since session 19) in one call: their GPU test, decode-step profiles on
    # the defaults, without the one-split rule and without either, then batch-64 rollouts without either and
    # on the defaults (LAUNCHES_DENSE=1: and with kept bf16 expert copies, so that the prefill decodes none)
    timeout 60 python -m pytest -m gpu -q -p no:cacheprovider -rfE -k combine_parts tests/test_moe_gpu.py 2>&1 \
        | tee "$out/combine_test.log" | tail -2
    timeout ${PROFILE_TIMEOUT:-150} python benchmarks/profile_decode.py --launch-ab > "$out/profile_decode_launches.txt" 2>&1
    grep -E "graph replay|CUDA time|Error" "$out/profile_decode_launches.txt"
    run=0
    for args in "--no-combine-parts --one-split-max-capacity 0" "" ${LAUNCHES_DENSE:+"--dense-experts-gb 40"}; do
        run=$((run + 1)); echo "rollouts ${args:-(defaults)}"
        timeout ${GEN_TIMEOUT:-90} python benchmarks/generate.py --skip-hf --shapes ${GEN_SHAPES:-batch64} $args \
            --out "$out/generate_launches_$run.json" 2>&1 | tee -a "$out/generate_launches.log" \
            | grep -oE '"name": "[a-z0-9_]+"|"tokens_per_second": [0-9.]+|"prefill_seconds": [0-9.]+' | paste -sd' '
    done
fi
if [[ $what == *" trainab "* ]]; then  # session 18: the log-probs' hidden-state gradient in the forward
    # (EAGER_GRADIENT), then also q, k and v fused (FUSED_TRAINING_QKV), both on by default since session 19:
    # the eager gradient's GPU test, then 4K/8K steps without either, without the fused q/k/v, and on the
    # defaults, timed in turn in one process (session 19: one process each was swamped by a slow start)
    timeout 90 python -m pytest -m gpu -q -p no:cacheprovider -rfE -k eager_logprob tests/test_train_gpu.py 2>&1 \
        | tee "$out/eager_test.log" | tail -2
    timeout ${TRAINAB_TIMEOUT:-200} python benchmarks/train.py --tokens ${TRAINAB_TOKENS:-4096,8192} --repeats 7 \
        --interleave "no-eager-logprob-grad,no-fused-training-qkv;no-fused-training-qkv;" --out "$out/train_ab.json" \
        2>&1 | tee "$out/train_ab.log" | grep -oE '"tokens": [0-9]+, "configuration": [^]]*\], "seconds": [0-9.]+'
fi
if [[ $what == *" steptimes "* ]]; then  # session 19: steps after a process's first compiles ran slow
    run=0
    for args in "" "--threads 1" "--compile-threads 1"; do
        run=$((run + 1)); echo "step_times ${args:-(as the host is)}"
        timeout ${STEPTIMES_TIMEOUT:-150} python benchmarks/step_times.py --profile $args \
            --out "$out/step_times_$run.json" 2>&1 | tee "$out/step_times_$run.log" \
            | grep -oE '"tokens": [0-9]+, "step": [0-9]+, "seconds": [0-9.]+|"gpu_ms": [0-9.]+, "cpu_ms": [0-9.]+' | paste -sd' '
    done
fi
if [[ $what == *" graphprobe "* ]]; then  # session 21: what the host's share of the step would leave
    timeout ${GRAPHPROBE_TIMEOUT:-330} python benchmarks/graph_probe.py --lengths ${GRAPHPROBE_LENGTHS:-1024,4096,8192} \
        --out "$out/graph_probe.json" 2>&1 | tee "$out/graph_probe.log" | grep -vE "Warning|warn" | tail -30 | cut -c1-400
fi
if [[ $what == *" hostprof "* ]]; then  # session 20: below 8K the training step waits for the host
    # (1K: 215.7 ms a step, the GPU busy 93.0 ms); where the host's time goes, and its syncs
    timeout ${HOSTPROF_TIMEOUT:-200} python benchmarks/step_times.py --lengths ${HOSTPROF_LENGTHS:-1024,4096} --steps 7 \
        --host-profile --out "$out/step_times_host.json" 2>&1 | tee "$out/step_times_host.log" \
        | grep -vE "Warning|warn" | tail -80 | cut -c1-200
fi
if [[ $what == *" flextune "* ]]; then  # session 17: FlexAttention tile options on the training shape
    timeout ${FLEXTUNE_TIMEOUT:-300} python benchmarks/flex_tune.py --tokens ${FLEXTUNE_TOKENS:-4096} \
        --out "$out/flex_tune.json" 2>&1 | tee "$out/flex_tune.log" | grep -E '"name"|fastest|Error' \
        | grep -oE '"name": "[^"]+"|"layers_ms": [0-9.]+|"error": "[^"]{0,80}|fastest.*' | paste -sd' ' | sed 's/"name"/\n&/g'
fi
if [[ $what == *" attnprobe "* ]]; then  # session 23: sink attention, FlexAttention against FlashAttention-2 varlen
    # ATTNPROBE_ARGS (optional): e.g. --profile (each path's kernels, one step per case)
    timeout ${ATTNPROBE_TIMEOUT:-300} python benchmarks/attn_probe.py --tokens ${ATTNPROBE_TOKENS:-4096,8192} \
        ${ATTNPROBE_ARGS:-} --out "$out/attn_probe.json" 2>&1 | tee "$out/attn_probe.log" | cut -c1-400
fi
# varlenab: session 23: 4K/8K steps, FlexAttention then varlen, in turn (VARLENAB_CONFIGS: other --interleave
# configurations, e.g. "no-cudnn-full-layers;cudnn-full-layers")
if [[ $what == *" varlenab "* ]]; then
    for captured in "" --interleave-captured; do  # eager steps, then every step replayed from CUDA graphs
        name=train_varlen_ab${captured:+_captured}
        timeout ${VARLENAB_TIMEOUT:-300} python benchmarks/train.py --skip-hf --tokens ${VARLENAB_TOKENS:-4096,8192} \
            --dense-experts-gb ${VARLENAB_DENSE_GB:-40} --repeats 3 \
            --interleave "${VARLENAB_CONFIGS:-no-varlen-attention;varlen-attention}" $captured --out "$out/$name.json" 2>&1 \
            | tee "$out/$name.log" | grep -E '^\{|Error|error' | cut -c1-300
    done
fi
if [[ $what == *" profcaptured "* ]]; then  # session 23: a replayed 4K step's kernels, FlexAttention then varlen
    for flag in ${PROF_FLAGS:---no-varlen-attention --varlen-attention}; do  # (session 24: PROF_FLAGS, e.g. "--cudnn-full-layers")
        timeout 150 python benchmarks/profile_train.py --tokens ${PROF_TOKENS:-4096} --dense-experts-gb 40 \
            --captured --top 40 $flag > "$out/profile_train_captured$flag.txt" 2>&1
        grep -E "tokens: step|captured:" "$out/profile_train_captured$flag.txt"
    done
fi
if [[ $what == *" densesweep "* ]]; then  # session 23: the bf16 experts' tiles at 4K / 8K tokens (kept copies)
    timeout ${DENSESWEEP_TIMEOUT:-400} python benchmarks/moe.py --dense-train-sweep \
        --out "$out/moe_dense_train_sweep.json" 2>&1 | tee "$out/moe_dense_train_sweep.log" \
        | grep -E "dense_train_sweep|Error" | cut -c1-260
fi
if [[ $what == *" dense "* ]]; then  # session 16: kept bf16 expert copies: the GPU test, a 4K/8K step without and with
    timeout 100 python -m pytest -m gpu -q -p no:cacheprovider -rfE -k dense_expert_copies tests/test_train_gpu.py 2>&1 \
        | tee "$out/dense_test.log" | tail -3
    # DENSE_HF=1: transformers + PEFT at the same sizes after ours, in the same run (the train table's ratios)
    hf=(--skip-hf); [[ -n ${DENSE_HF:-} ]] && hf=(--hf-tokens ${DENSE_TOKENS:-4096,8192})
    timeout ${DENSE_TIMEOUT:-200} python benchmarks/train.py "${hf[@]}" --full-checkpoint-tokens "" --tokens ${DENSE_TOKENS:-4096,8192} \
        --dense-experts-gb ${DENSE_GB:-40} --dense-ab --out "$out/train_dense_ab.json" 2>&1 | tee "$out/train_dense_ab.log" \
        | grep -oE '"tokens": [0-9]+|"seconds": [0-9.]+|"peak_gib": [0-9.]+|"checkpointed_layers": [0-9]+|"dense_experts_gib": [0-9.]+' \
        | paste -sd' '
fi
if [[ $what == *" launchtimes "* ]]; then  # session 24: each training launch of the bf16 experts, per tile
    timeout ${LAUNCH_TIMEOUT:-300} python benchmarks/moe.py --launch-times --dense-train-tokens ${LAUNCH_TOKENS:-4096,8192} \
        --out "$out/moe_launch_times.json" 2>&1 | tee "$out/moe_launch_times.log" | grep -E "launch_times|Error" | cut -c1-400
fi
if [[ $what == *" cudnnprobe "* ]]; then
    timeout ${PROBE_TIMEOUT:-150} python benchmarks/cudnn_probe.py --out "$out/cudnn_probe.json" 2>&1 \
        | tee "$out/cudnn_probe.log" | tail -30
fi
if [[ $what == *" generate "* ]]; then
    timeout ${GEN_TIMEOUT:-420} python benchmarks/generate.py ${GEN_ARGS:-} --out "$out/generate.json" 2>&1 | tee "$out/generate.log" | tail -20
fi
