"""Export layer: StageSpec, ONNX export, engines (ONNX Runtime, TensorRT, AOTInductor), engine cache.

Modules (import them directly; this package imports nothing, so `cascade_rt.export.specs` stays light):

    specs        StageSpec per graph (text, stage_c_cond, stage_c, stage_b_cond, stage_b, stage_a, effnet,
                 previewer): tensor names/dtypes, shapes from Dims(batch, height, width, cfg), dynamic axes,
                 min/opt/max profiles, sample inputs (latent shapes: cascade_rt.stages)
    graph_modules the exported nn.Modules (per-step denoisers, per-prompt conditioning), pack/unpack_cond_kv
    onnx_export  export_onnx(model, spec, path, dims=, dynamic=) -> checked ONNX graph (+ external data)
    onnx_passes  TensorRT rewrites: Resize in fp32, ConvTranspose dtypes (prepare_for_tensorrt)
    engine       the Engine protocol (load(), engine(feed) -> outputs, .spec, .manifest), input checks
    opener       open_engine(manifest) -> the loaded engine of its format
    ort_engine   OrtEngine      trt_engine  TrtEngine, build_engine      aoti_engine  AotiEngine, compile_aoti
    manifest     Manifest (what an engine is, what built it, sha256 of its files, validation), reuse rules
    validate     engine vs eager on fresh random inputs, per-precision tolerances
    build        EngineRequest, per-format builders      cache  EngineCache (ensure / load / verify / clean)
    loader       load_engine(kind, stage, model, ...): the runtime's entry point; preset_of
    refit        refit plans (where a graph holds each LoRA target) and LoRA switches on loaded engines
    sources      random-weight or weights-folder models for the CLI; model_fingerprint
"""
