"""Export layer: StageSpec, ONNX export, engines (ONNX Runtime, TensorRT, AOTInductor), engine cache."""
