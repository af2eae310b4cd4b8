// Trains one sparse MoE layer on a synthetic task and shows routing collapse and its cures.
//
// Task: inputs come from 8 clusters; the target of a cluster-c input is its own nonlinear map
// f_c(x) = A_c tanh(B_c x). A layer that gives each cluster its own expert can fit all eight; a
// layer whose router collapsed onto two experts cannot.
//
// Three runs start from the SAME weights, including a skewed router that prefers experts 0 and 1
// for every token (a +4 logit on a constant input feature), and see the same data:
//   none      no balancing: the unchosen experts never receive a gradient, the load stays collapsed
//   aux       + aux_coef * HF load-balancing loss (Switch/Mixtral; uniform routing gives k)
//   aux_free  DeepSeek-V3 auxiliary-loss-free balancing: a selection bias b_i += gamma *
//             sign(mean load - load_i) after each step (group-limited gating, one group, softmax
//             scores: the same weights as Mixtral, the bias only changes the selection)
// Adam is written out below. Every --print-every steps a line shows the task loss (MSE), the aux
// loss value, the coefficient of variation of the expert load, and the dead experts.
//
//   train_moe [--steps N] [--quick] [--csv FILE] [--print-every N] [--seed N]
//
// --quick runs a short version and checks it (the ctest): exit status 1 unless every run's task
// loss decreased, and both balanced runs end with a lower task loss than the unbalanced one, a
// load CV < 0.3 and no dead expert (averages over the last 50 steps). Why 0.3: with
// E experts, one dead expert forces CV >= 1 / sqrt(E - 1) (0.378 for E = 8, the minimum being the
// other E - 1 equally loaded), so CV < 0.3 proves every expert is used, while the collapsed start
// (two experts take everything) has CV = sqrt(E / 2 - 1) = 1.73.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/moe.hpp"

namespace {

using moe::Index;
using T = float;
using Mat = moe::RowMatrix<T>;

constexpr Index kDim = 32;      // d_model (the last feature is a constant 1)
constexpr Index kFf = 32;       // d_ff of an expert
constexpr Index kExperts = 8;   // E
constexpr Index kTopK = 2;      // k
constexpr Index kClusters = 8;  // clusters of the task
constexpr Index kHidden = 24;   // width of each cluster's target map
constexpr Index kBatch = 256;   // tokens per step

struct Args {
  Index steps = 1500;
  Index print_every = 100;
  bool quick = false;
  std::string csv;  // empty: no CSV (nothing is written unless asked)
  std::uint64_t seed = 7;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--quick") {
      a.quick = true;
      a.steps = 400;
      continue;
    }
    if (flag == "--help" || flag == "-h") {
      std::printf(
          "usage: train_moe [--steps N] [--quick] [--csv FILE] [--print-every N] "
          "[--seed N]\n");
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
    const std::string v = argv[++i];
    if (flag == "--steps") {
      a.steps = std::stol(v);
    } else if (flag == "--csv") {
      a.csv = v;
    } else if (flag == "--print-every") {
      a.print_every = std::max(1L, std::stol(v));
    } else if (flag == "--seed") {
      a.seed = std::stoull(v);
    } else {
      throw std::invalid_argument("unknown flag " + flag);
    }
  }
  return a;
}

Mat normal(Index rows, Index cols, double scale, std::mt19937_64& rng) {
  std::normal_distribution<double> d(0.0, scale);
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(d(rng));
  return m;
}

/// The synthetic task: cluster centres and one target map per cluster.
struct Task {
  std::vector<Mat> centre, a, b;
  explicit Task(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    for (Index c = 0; c < kClusters; ++c) {
      Mat m = normal(1, kDim, 1.0, rng);
      m(0, kDim - 1) = 1;  // constant feature
      centre.push_back(m);
      a.push_back(normal(kDim, kHidden, 1.0 / std::sqrt(double(kHidden)), rng));
      b.push_back(normal(kHidden, kDim, 1.5 / std::sqrt(double(kDim)), rng));
    }
  }
  /// A batch: x = centre + noise (constant feature kept at 1), y = A_c tanh(B_c x).
  void sample(std::mt19937_64& rng, Mat& x, Mat& y) const {
    std::uniform_int_distribution<Index> pick(0, kClusters - 1);
    std::normal_distribution<double> noise(0.0, 0.3);
    for (Index t = 0; t < x.rows(); ++t) {
      const Index c = pick(rng);
      for (Index i = 0; i < kDim - 1; ++i) x(t, i) = centre[c](0, i) + static_cast<T>(noise(rng));
      x(t, kDim - 1) = 1;
      const Mat h = (b[c] * x.row(t).transpose()).array().tanh().matrix();
      y.row(t) = (a[c] * h).transpose();
    }
  }
};

/// Adam (Kingma & Ba 2015) on one tensor: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2,
/// w -= lr * m_hat / (sqrt(v_hat) + eps), with bias-corrected m_hat, v_hat.
struct Adam {
  double lr = 3e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  std::vector<Mat> m, v;
  Index step = 0;
  void update(const std::vector<Mat*>& params, const std::vector<const Mat*>& grads) {
    if (m.empty()) {
      for (const Mat* p : params) {
        m.push_back(Mat::Zero(p->rows(), p->cols()));
        v.push_back(Mat::Zero(p->rows(), p->cols()));
      }
    }
    ++step;
    const double c1 = 1 - std::pow(b1, double(step)), c2 = 1 - std::pow(b2, double(step));
    for (std::size_t i = 0; i < params.size(); ++i) {
      T* w = params[i]->data();
      const T* g = grads[i]->data();
      T* mi = m[i].data();
      T* vi = v[i].data();
      for (Index j = 0; j < params[i]->size(); ++j) {
        mi[j] = static_cast<T>(b1 * mi[j] + (1 - b1) * g[j]);
        vi[j] = static_cast<T>(b2 * vi[j] + (1 - b2) * g[j] * g[j]);
        w[j] -= static_cast<T>(lr * (mi[j] / c1) / (std::sqrt(vi[j] / c2) + eps));
      }
    }
  }
};

enum class Balancing { none, aux, aux_free };

const char* name(Balancing b) {
  return b == Balancing::none ? "none" : b == Balancing::aux ? "aux" : "aux_free";
}

struct Summary {
  std::string run;
  double first_loss = 0, final_loss = 0, final_cv = 0, final_aux = 0;
  double final_dead = 0;
};

/// The same starting weights for every run: small random experts, a router skewed to experts
/// 0 and 1 through the constant feature.
moe::MoeWeights<T> initial_weights(const moe::MoeConfig& config, bool with_bias,
                                   std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto w = moe::MoeWeights<T>::zeros(config, true, with_bias);
  w.router = normal(kExperts, kDim, 0.02, rng);
  w.router(0, kDim - 1) = 4;
  w.router(1, kDim - 1) = 4;
  w.experts.stacked_in() = normal(kExperts * 2 * kFf, kDim, 1.0 / std::sqrt(double(kDim)), rng);
  w.experts.stacked_out() = normal(kExperts * kDim, kFf, 1.0 / std::sqrt(double(kFf)), rng);
  return w;
}

template <class Gating>
Summary train(Balancing mode, const typename Gating::Options& options, const Args& args,
              const Task& task, std::FILE* csv) {
  moe::MoeConfig config;
  config.d_model = kDim;
  config.d_ff = kFf;
  config.num_experts = kExperts;
  config.top_k = kTopK;
  moe::MoeWeights<T> params = initial_weights(config, Gating::uses_bias, args.seed + 1);
  auto grads = moe::MoeGradients<T>::zeros_like(params);
  moe::Workspace<T> ws;
  ws.set_training(true);
  moe::BackwardWorkspace<T> bws;
  Adam adam;
  moe::LossCoefficients coeffs;  // HF load-balancing loss; its value is logged in every run
  coeffs.aux = mode == Balancing::aux ? 0.02 : 0.0;
  const double gamma = 2e-3;  // bias update speed of aux_free (DeepSeek-V3: 1e-3)

  std::mt19937_64 data_rng(args.seed);  // the same batches for every run
  Mat x(kBatch, kDim), target(kBatch, kDim), y(kBatch, kDim), dy(kBatch, kDim), dx(kBatch, kDim);
  Summary s;
  s.run = name(mode);
  const Index tail = std::max<Index>(1, std::min<Index>(50, args.steps / 5));
  double sum_loss = 0, sum_cv = 0, sum_aux = 0, sum_dead = 0;
  for (Index step = 0; step < args.steps; ++step) {
    task.sample(data_rng, x, target);
    // The block is immutable: rebuild it from the current parameters (a few hundred kB).
    const moe::SparseMoeBlock<T, Gating> block(config, params, options);
    block.forward(x, y, ws);
    const Mat err = y - target;
    const double loss = double(err.squaredNorm()) / double(err.size());
    dy = err * static_cast<T>(2.0 / double(err.size()));  // d MSE / dy
    grads.set_zero();
    const moe::LossValues lv = moe::block_backward(block, x, dy, ws, grads, dx, coeffs, bws);
    adam.update({&params.router, &params.experts.stacked_in(), &params.experts.stacked_out()},
                {&grads.router, &grads.experts.stacked_in(), &grads.experts.stacked_out()});
    const moe::RoutingStats& st = ws.stats();
    if (mode == Balancing::aux_free) {
      moe::aux_free_bias_update<T>(params.router_bias, st.tokens_per_expert, gamma);
    }
    if (step == 0) s.first_loss = loss;
    if (step >= args.steps - tail) {
      sum_loss += loss;
      sum_cv += st.load_cv;
      sum_aux += lv.aux;
      sum_dead += double(st.dead_experts);
    }
    if (csv)
      std::fprintf(csv, "%s,%ld,%.6g,%.6g,%.6g,%ld,%.6g\n", s.run.c_str(), long(step), loss, lv.aux,
                   st.load_cv, long(st.dead_experts), st.imbalance);
    if (step % args.print_every == 0 || step == args.steps - 1) {
      std::printf("%-8s step %5ld  loss %.4f  aux %.3f  load CV %.3f  dead %ld  load",
                  s.run.c_str(), long(step), loss, lv.aux, st.load_cv, long(st.dead_experts));
      for (Index e : st.tokens_per_expert) std::printf(" %ld", long(e));
      std::printf("\n");
    }
  }
  s.final_loss = sum_loss / double(tail);
  s.final_cv = sum_cv / double(tail);
  s.final_aux = sum_aux / double(tail);
  s.final_dead = sum_dead / double(tail);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_moe: %s\n", e.what());
    return 2;
  }
  std::FILE* csv = nullptr;
  if (!args.csv.empty()) {
    csv = std::fopen(args.csv.c_str(), "w");
    if (!csv) {
      std::fprintf(stderr, "train_moe: cannot write %s\n", args.csv.c_str());
      return 2;
    }
    std::fprintf(csv, "run,step,task_loss,aux_loss,load_cv,dead_experts,imbalance\n");
  }
  const Task task(args.seed);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<Summary> runs;
  try {
    runs.push_back(train<moe::gating::SoftmaxTopK>(
        Balancing::none, moe::gating::SoftmaxTopK::Options::mixtral(), args, task, csv));
    runs.push_back(train<moe::gating::SoftmaxTopK>(
        Balancing::aux, moe::gating::SoftmaxTopK::Options::mixtral(), args, task, csv));
    // Mixtral's softmax weights with a DeepSeek-V3 selection bias: one group, softmax scores.
    auto o = moe::gating::GroupLimitedTopK::Options::deepseek_v3(1, 1, 1.0, true);
    o.scoring = moe::gating::Scoring::softmax;
    runs.push_back(train<moe::gating::GroupLimitedTopK>(Balancing::aux_free, o, args, task, csv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_moe: %s\n", e.what());
    if (csv) std::fclose(csv);
    return 2;
  }
  if (csv) std::fclose(csv);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("\n%ld steps x %ld tokens per run, %.1f s; CSV: %s\n", long(args.steps), long(kBatch),
              seconds, args.csv.empty() ? "(none: --csv FILE writes one)" : args.csv.c_str());
  std::printf("%-8s  %10s  %10s  %8s  %8s  %6s\n", "run", "first loss", "final loss", "aux",
              "load CV", "dead");
  for (const Summary& s : runs) {
    std::printf("%-8s  %10.4f  %10.4f  %8.3f  %8.3f  %6.1f\n", s.run.c_str(), s.first_loss,
                s.final_loss, s.final_aux, s.final_cv, s.final_dead);
  }
  if (!args.quick) return 0;
  // The checks of the ctest (see the header comment for the 0.3 threshold).
  bool ok = true;
  for (const Summary& s : runs) {
    if (!(s.final_loss < s.first_loss)) {
      std::printf("FAIL %s: the task loss did not decrease (%.4f -> %.4f)\n", s.run.c_str(),
                  s.first_loss, s.final_loss);
      ok = false;
    }
  }
  for (std::size_t i = 1; i < runs.size(); ++i) {
    if (!(runs[i].final_loss < runs[0].final_loss)) {
      std::printf("FAIL %s: final task loss %.4f is not below the unbalanced run's %.4f\n",
                  runs[i].run.c_str(), runs[i].final_loss, runs[0].final_loss);
      ok = false;
    }
    if (!(runs[i].final_cv < 0.3) || runs[i].final_dead > 0) {
      std::printf("FAIL %s: load CV %.3f (needs < 0.3), dead experts %.1f\n", runs[i].run.c_str(),
                  runs[i].final_cv, runs[i].final_dead);
      ok = false;
    }
  }
  std::printf(ok ? "PASS\n" : "FAIL\n");
  return ok ? 0 : 1;
}
