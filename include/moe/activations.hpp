// moe: activation functions of the expert FFNs, with the derivatives the backward pass needs, and
// the FFN kinds (gated GLU variants, plain MLP) that select them at compile time.
#pragma once

#include <cmath>

namespace moe {

/// SiLU (swish): x * sigmoid(x). Mixtral, Qwen, OLMoE, DeepSeek (SwiGLU).
struct Silu {
  template <class T>
  static T value(T x) {
    return x / (T(1) + std::exp(-x));
  }
  template <class T>
  static T derivative(T x) {
    const T s = T(1) / (T(1) + std::exp(-x));
    return s * (T(1) + x * (T(1) - s));
  }
};

/// Exact GELU: x * Phi(x) (PyTorch gelu, approximate='none'). GeGLU. Phi(x) is computed as
/// erfc(-x / sqrt 2) / 2, which equals PyTorch's (1 + erf(x / sqrt 2)) / 2 but keeps its relative
/// accuracy deep in the negative tail, where 1 + erf cancels.
struct Gelu {
  template <class T>
  static T value(T x) {
    return T(0.5) * x * std::erfc(-x * T(0.70710678118654752440));
  }
  template <class T>
  static T derivative(T x) {
    const T cdf = T(0.5) * std::erfc(-x * T(0.70710678118654752440));
    const T pdf = T(0.39894228040143267794) * std::exp(T(-0.5) * x * x);
    return cdf + x * pdf;
  }
};

/// GELU, tanh approximation (PyTorch gelu, approximate='tanh'; gelu_pytorch_tanh in HF configs).
struct GeluTanh {
  template <class T>
  static T value(T x) {
    const T u = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
    return T(0.5) * x * (T(1) + std::tanh(u));
  }
  template <class T>
  static T derivative(T x) {
    const T u = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
    const T t = std::tanh(u);
    const T du = T(0.79788456080286535588) * (T(1) + T(3) * T(0.044715) * x * x);
    return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du;
  }
};

/// ReLU: Switch Transformers' plain MLP.
struct Relu {
  template <class T>
  static T value(T x) {
    return x > T(0) ? x : T(0);
  }
  template <class T>
  static T derivative(T x) {
    return x > T(0) ? T(1) : T(0);
  }
};

/// Squared ReLU: relu(x)^2 (Nemotron-H experts, mlp_hidden_act "relu2").
struct Relu2 {
  template <class T>
  static T value(T x) {
    return x > T(0) ? x * x : T(0);
  }
  template <class T>
  static T derivative(T x) {
    return x > T(0) ? T(2) * x : T(0);
  }
};

/// Gated FFN kind: down(act(gate x) * (up x)). The input projection of one expert is stored fused,
/// [2 d_ff x d_model], gate rows first (the transformers v5 gate_up_proj layout).
template <class Activation>
struct Gated {
  using activation = Activation;
  static constexpr bool gated = true;
};

/// Plain FFN kind: out(act(in x)), input projection [d_ff x d_model] (Switch wi / wo).
template <class Activation>
struct Plain {
  using activation = Activation;
  static constexpr bool gated = false;
};

using SwiGLU = Gated<Silu>;     ///< Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek experts
using GeGLU = Gated<Gelu>;      ///< GeGLU (erf GELU)
using ReluMlp = Plain<Relu>;    ///< Switch Transformers experts
using GeluMlp = Plain<Gelu>;    ///< plain GELU MLP
using GeGLUTanh = Gated<GeluTanh>;  ///< Gemma 4 experts (gelu_pytorch_tanh)
using Relu2Mlp = Plain<Relu2>;      ///< Nemotron-H experts (ungated relu^2)

}  // namespace moe
