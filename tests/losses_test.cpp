// Tests of moe/losses.hpp: values against the scalar reference (tests/reference/reference_moe.hpp)
// and the golden cases, gradients against central finite differences, the bias update, errors.
#include "moe/losses.hpp"

#include <functional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/moe.hpp"

#include "reference/golden_case.hpp"
#include "reference/reference_moe.hpp"
#include "test_util.hpp"

namespace moe {
namespace {

using test::random_matrix;

std::vector<double> flat(const RowMatrix<double>& m) {
  return std::vector<double>(m.data(), m.data() + m.size());
}

/// Central differences of f with respect to every entry of z, against the analytic `grad`.
void expect_fd(RowMatrix<double> z, const RowMatrix<double>& grad,
               const std::function<double(const RowMatrix<double>&)>& f, double tol = 1e-8) {
  const double h = 1e-6;
  for (Index i = 0; i < z.size(); ++i) {
    const double orig = z.data()[i];
    z.data()[i] = orig + h;
    const double fp = f(z);
    z.data()[i] = orig - h;
    const double fm = f(z);
    z.data()[i] = orig;
    const double fd = (fp - fm) / (2 * h);
    EXPECT_NEAR(grad.data()[i], fd, tol * (1 + std::abs(fd))) << "entry " << i;
  }
}

TEST(Losses, LoadBalancingMatchesReferenceWithAndWithoutMask) {
  std::mt19937_64 rng(1);
  const Index T = 23, E = 7, k = 3;
  const RowMatrix<double> z = random_matrix<double>(T, E, rng, 1.5);
  std::vector<double> mask(T);
  for (Index t = 0; t < T; ++t) mask[static_cast<std::size_t>(t)] = (t % 5 == 2) ? 0.0 : 1.0;
  const auto zf = flat(z);
  EXPECT_NEAR(losses::load_balancing_loss<double>(z, k), ref::hf_load_balancing_loss(zf, T, E, k),
              1e-14);
  EXPECT_NEAR(losses::load_balancing_loss<double>(z, k, BalanceNormalization::hf, mask.data()),
              ref::hf_load_balancing_loss(zf, T, E, k, &mask), 1e-14);
  EXPECT_NEAR(
      losses::load_balancing_loss<double>(z, k, BalanceNormalization::megablocks, mask.data()),
      ref::megablocks_load_balancing_loss(zf, T, E, k, &mask), 1e-14);
}

TEST(Losses, UniformRoutingGivesKForHfAndOneForMegaBlocks) {
  // Equal logits: p = 1/E; 8 tokens x top-2 over 8 experts with a rotating selection is not
  // reachable with equal logits (ties go to the lower index), so build counts from logits that
  // are uniform up to a tiny per-token offset choosing a different pair per token.
  const Index T = 8, E = 8, k = 2;
  RowMatrix<double> z = RowMatrix<double>::Zero(T, E);
  for (Index t = 0; t < T; ++t) {
    z(t, (2 * t) % E) = 1e-9;
    z(t, (2 * t + 1) % E) = 1e-9;
  }
  EXPECT_NEAR(losses::load_balancing_loss<double>(z, k), 2.0, 1e-7);
  EXPECT_NEAR(losses::load_balancing_loss<double>(z, k, BalanceNormalization::megablocks), 1.0,
              1e-7);
  // Collapse onto one expert for every token is the worst case: E * 1 * p_max.
  RowMatrix<double> c = RowMatrix<double>::Zero(T, E);
  c.col(0).setConstant(30.0);
  EXPECT_NEAR(losses::load_balancing_loss<double>(c, 1), static_cast<double>(E), 1e-9);
}

TEST(Losses, LoadBalancingLayersConcatenateOrAverage) {
  std::mt19937_64 rng(2);
  const Index T = 9, E = 6, k = 2;
  const RowMatrix<double> a = random_matrix<double>(T, E, rng),
                          b = random_matrix<double>(T, E, rng);
  RowMatrix<double> both(2 * T, E);
  both << a, b;
  std::vector<ConstMap<double>> layers = {ConstMap<double>(a.data(), T, E),
                                          ConstMap<double>(b.data(), T, E)};
  EXPECT_NEAR(losses::load_balancing_loss_layers<double>(layers, k),
              ref::hf_load_balancing_loss(flat(both), 2 * static_cast<int>(T), E, k), 1e-14);
  EXPECT_NEAR(
      losses::load_balancing_loss_layers<double>(layers, k, BalanceNormalization::hf,
                                                 LayerReduction::average),
      0.5 * (losses::load_balancing_loss<double>(a, k) + losses::load_balancing_loss<double>(b, k)),
      1e-14);
  // Gradients of both reductions, with a mask repeated per layer.
  std::vector<double> mask = {1, 1, 1, 0, 1, 1, 0, 1, 1};
  for (LayerReduction red : {LayerReduction::concatenate, LayerReduction::average}) {
    RowMatrix<double> ga = RowMatrix<double>::Zero(T, E), gb = RowMatrix<double>::Zero(T, E);
    losses::load_balancing_loss_layers<double>(layers, k, BalanceNormalization::megablocks, red,
                                               mask.data(), {ga.data(), gb.data()}, 0.7);
    expect_fd(a, ga, [&](const RowMatrix<double>& za) {
      std::vector<ConstMap<double>> l = {ConstMap<double>(za.data(), T, E), layers[1]};
      return 0.7 * losses::load_balancing_loss_layers<double>(
                       l, k, BalanceNormalization::megablocks, red, mask.data());
    });
    expect_fd(b, gb, [&](const RowMatrix<double>& zb) {
      std::vector<ConstMap<double>> l = {layers[0], ConstMap<double>(zb.data(), T, E)};
      return 0.7 * losses::load_balancing_loss_layers<double>(
                       l, k, BalanceNormalization::megablocks, red, mask.data());
    });
  }
}

TEST(Losses, LoadBalancingGradient) {
  std::mt19937_64 rng(3);
  const Index T = 11, E = 5, k = 2;
  const RowMatrix<double> z = random_matrix<double>(T, E, rng, 2.0);
  std::vector<double> mask(T, 1.0);
  mask[3] = 0;
  mask[7] = 0.5;                                                  // fractional weights are allowed
  RowMatrix<double> g = RowMatrix<double>::Constant(T, E, 0.25);  // accumulates onto this
  losses::load_balancing_loss<double>(z, k, BalanceNormalization::hf, mask.data(), g.data(), 1.7);
  g.array() -= 0.25;
  expect_fd(z, g, [&](const RowMatrix<double>& zz) {
    return 1.7 * losses::load_balancing_loss<double>(zz, k, BalanceNormalization::hf, mask.data());
  });
}

TEST(Losses, SwitchLoadBalancingMatchesReferenceAndGradient) {
  std::mt19937_64 rng(4);
  const int B = 3, S = 5, E = 4;
  const RowMatrix<double> z = random_matrix<double>(B * S, E, rng);
  RowMatrix<std::int32_t> idx(B * S, 1);
  std::vector<int> idx_ref;
  for (Index t = 0; t < B * S; ++t) {
    Index best = 0;
    for (Index e = 1; e < E; ++e) best = z(t, e) > z(t, best) ? e : best;
    idx(t, 0) = static_cast<std::int32_t>(t % 4 == 3 ? 0 : best);  // some "postcap" zeros
    idx_ref.push_back(idx(t, 0));
  }
  EXPECT_NEAR(losses::switch_load_balancing_loss<double>(z, idx, S),
              ref::switch_load_balancing_loss(flat(z), idx_ref, B, S, E), 1e-14);
  RowMatrix<double> g = RowMatrix<double>::Zero(B * S, E);
  losses::switch_load_balancing_loss<double>(z, idx, S, g.data(), 0.3);
  expect_fd(z, g, [&](const RowMatrix<double>& zz) {
    return 0.3 * losses::switch_load_balancing_loss<double>(zz, idx, S);
  });
}

TEST(Losses, RouterZLossMatchesReferenceAndGradient) {
  std::mt19937_64 rng(5);
  const RowMatrix<double> z = random_matrix<double>(13, 6, rng, 3.0);
  EXPECT_NEAR(losses::router_z_loss<double>(z), ref::router_z_loss(flat(z), 13, 6), 1e-12);
  RowMatrix<double> g = RowMatrix<double>::Zero(13, 6);
  losses::router_z_loss<double>(z, g.data(), 0.01);
  expect_fd(z, g,
            [](const RowMatrix<double>& zz) { return 0.01 * losses::router_z_loss<double>(zz); });
  // Large logits do not overflow: logsumexp subtracts the maximum.
  RowMatrix<double> big = RowMatrix<double>::Constant(2, 3, 800.0);
  EXPECT_NEAR(losses::router_z_loss<double>(big), std::pow(800.0 + std::log(3.0), 2), 1e-9);
}

TEST(Losses, DeepSeekSequenceBalanceMatchesReferenceAndGradient) {
  std::mt19937_64 rng(6);
  const int B = 2, S = 6, E = 8, k = 3;
  const RowMatrix<double> z = random_matrix<double>(B * S, E, rng);
  RowMatrix<std::int32_t> idx(B * S, k);
  std::vector<int> idx_ref;
  for (Index t = 0; t < B * S; ++t) {
    kernels::top_k(&z(t, 0), E, k, &idx(t, 0));
    for (Index j = 0; j < k; ++j) idx_ref.push_back(idx(t, j));
  }
  EXPECT_NEAR(losses::deepseek_sequence_balance_loss<double>(z, idx, S),
              ref::deepseek_seq_balance_loss(flat(z), idx_ref, B, S, E, k), 1e-14);
  RowMatrix<double> g = RowMatrix<double>::Zero(B * S, E);
  losses::deepseek_sequence_balance_loss<double>(z, idx, S, g.data(), 2.0);
  expect_fd(z, g, [&](const RowMatrix<double>& zz) {
    return 2.0 * losses::deepseek_sequence_balance_loss<double>(zz, idx, S);
  });
}

TEST(Losses, ShazeerImportanceAndLoadMatchReferenceAndGradients) {
  std::mt19937_64 rng(7);
  const int T = 10, E = 5, k = 2;
  const RowMatrix<double> clean = random_matrix<double>(T, E, rng);
  const RowMatrix<double> std_dev = (random_matrix<double>(T, E, rng).array().exp() * 0.5).matrix();
  const RowMatrix<double> eps = random_matrix<double>(T, E, rng);
  const RowMatrix<double> noisy = (clean.array() + eps.array() * std_dev.array()).matrix();
  RowMatrix<double> gates = RowMatrix<double>::Zero(T, E);
  for (Index t = 0; t < T; ++t) {
    std::int32_t idx[2];
    kernels::top_k(&noisy(t, 0), E, k, idx);
    const double a = std::exp(noisy(t, idx[0])), b = std::exp(noisy(t, idx[1]));
    gates(t, idx[0]) = a / (a + b);
    gates(t, idx[1]) = b / (a + b);
  }
  EXPECT_NEAR(losses::shazeer_importance_loss<double>(gates),
              ref::shazeer_importance_loss(flat(gates), T, E), 1e-13);
  EXPECT_NEAR(losses::shazeer_load_loss<double>(clean, noisy, std_dev, k),
              ref::shazeer_load_loss(flat(clean), flat(noisy), flat(std_dev), T, E, k), 1e-13);

  RowMatrix<double> dg = RowMatrix<double>::Zero(T, E);
  losses::shazeer_importance_loss<double>(gates, dg.data(), 0.5);
  expect_fd(gates, dg, [](const RowMatrix<double>& g) {
    return 0.5 * losses::shazeer_importance_loss<double>(g);
  });

  RowMatrix<double> dc = RowMatrix<double>::Zero(T, E), dn = dc, ds = dc;
  losses::shazeer_load_loss<double>(clean, noisy, std_dev, k, {dc.data(), dn.data(), ds.data()});
  expect_fd(clean, dc, [&](const RowMatrix<double>& c) {
    return losses::shazeer_load_loss<double>(c, noisy, std_dev, k);
  });
  expect_fd(noisy, dn, [&](const RowMatrix<double>& n) {
    return losses::shazeer_load_loss<double>(clean, n, std_dev, k);
  });
  expect_fd(std_dev, ds, [&](const RowMatrix<double>& s) {
    return losses::shazeer_load_loss<double>(clean, noisy, s, k);
  });
}

TEST(Losses, FloatLogitsGiveTheDoubleValue) {
  std::mt19937_64 rng(8);
  const RowMatrix<double> z = random_matrix<double>(17, 8, rng);
  const RowMatrix<float> zf = z.cast<float>();
  EXPECT_NEAR(losses::load_balancing_loss<float>(zf, 2), losses::load_balancing_loss<double>(z, 2),
              1e-6);
  EXPECT_NEAR(losses::router_z_loss<float>(zf), losses::router_z_loss<double>(z), 1e-5);
}

TEST(Losses, AuxFreeBiasUpdate) {
  Vector<double> bias(4);
  bias << 0.1, -0.2, 0.0, 0.3;
  const std::vector<Index> counts = {10, 2, 4, 4};  // mean 5
  aux_free_bias_update(bias, counts, 1e-3);
  EXPECT_DOUBLE_EQ(bias[0], 0.1 - 1e-3);   // overloaded: down
  EXPECT_DOUBLE_EQ(bias[1], -0.2 + 1e-3);  // underloaded: up
  EXPECT_DOUBLE_EQ(bias[2], 0.0 + 1e-3);
  const auto expected = ref::aux_free_bias_update({0.1, -0.2, 0.0, 0.3}, {10, 2, 4, 4}, 1e-3);
  for (Index i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(bias[i], expected[static_cast<std::size_t>(i)]);
  // Exactly balanced: no change (sign(0) = 0).
  Vector<float> fb = Vector<float>::Zero(3);
  aux_free_bias_update(fb, std::vector<double>{2, 2, 2}, 0.5);
  // A view (Eigen::Ref) of a bias stored elsewhere works too.
  Vector<double> owned = Vector<double>::Zero(2);
  aux_free_bias_update<double>(Eigen::Ref<Vector<double>>(owned), std::vector<int>{3, 1}, 0.25);
  EXPECT_EQ(owned[0], -0.25);
  EXPECT_EQ(owned[1], 0.25);
  EXPECT_EQ(fb, Vector<float>::Zero(3));
  test::expect_error<shape_error>(
      [&] {
        aux_free_bias_update<double>(bias, std::vector<Index>{1, 2}, 1e-3);
      },
      "moe: aux_free_bias_update: 2 counts for a bias of 4 experts");
}

TEST(Losses, ErrorMessages) {
  const RowMatrix<double> z = RowMatrix<double>::Zero(6, 4);
  test::expect_error<config_error>([&] { losses::load_balancing_loss<double>(z, 5); },
                                   "moe: load_balancing_loss top_k = 5 must be in [1, 4]");
  const RowMatrix<std::int32_t> idx = RowMatrix<std::int32_t>::Zero(6, 1);
  test::expect_error<config_error>(
      [&] { losses::switch_load_balancing_loss<double>(z, idx, 4); },
      "moe: 6 tokens are not a whole number of sequences of seq_len = 4");
  const RowMatrix<std::int32_t> short_idx = RowMatrix<std::int32_t>::Zero(5, 1);
  test::expect_error<shape_error>(
      [&] { losses::switch_load_balancing_loss<double>(z, short_idx); },
      "moe: switch_load_balancing_loss experts has shape [5 x 1], expected [6 x >= 1]");
  test::expect_error<config_error>(
      [&] { losses::shazeer_load_loss<double>(z, z, z, 4); },
      "moe: shazeer_load_loss needs 1 <= top_k < E, got top_k = 4, E = 4");
}

/// The golden Mixtral aux losses through the public loss API on the stored router logits.
TEST(Losses, GoldenMixtralMaskAuxLoss) {
  const golden::Case c(std::string(MOE_TEST_DATA_DIR) + "/reference/mixtral_mask.safetensors");
  const RowMatrix<double> z = c.mat("router_logits");
  const RowMatrix<std::int64_t> m = c.mat<std::int64_t>("attention_mask");
  std::vector<double> mask(m.data(), m.data() + m.size());
  const Index k = c.meta_int("top_k");
  const double aux =
      losses::load_balancing_loss<double>(z, k, BalanceNormalization::hf, mask.data());
  const double nomask = losses::load_balancing_loss<double>(z, k);
  EXPECT_NEAR(aux, c.mat("aux_loss")(0, 0), 1e-6 * std::abs(c.mat("aux_loss")(0, 0)));
  EXPECT_NEAR(nomask, c.mat("aux_loss_nomask")(0, 0),
              1e-6 * std::abs(c.mat("aux_loss_nomask")(0, 0)));
  EXPECT_NE(aux, nomask);
  EXPECT_NEAR(
      losses::load_balancing_loss<double>(z, k, BalanceNormalization::megablocks, mask.data()),
      aux / static_cast<double>(k), 1e-14);
}

TEST(Losses, GoldenSwitchAuxAndZLoss) {
  const golden::Case c(std::string(MOE_TEST_DATA_DIR) + "/reference/switch_capacity.safetensors");
  const RowMatrix<double> z = c.mat("router_logits");
  const RowMatrix<std::int64_t> idx64 = c.mat<std::int64_t>("topk_idx");
  const RowMatrix<std::int32_t> idx = idx64.cast<std::int32_t>();
  const Index S = c.meta_int("seq_len");
  EXPECT_NEAR(losses::switch_load_balancing_loss<double>(z, idx, S), c.mat("aux_loss")(0, 0),
              1e-6 * c.mat("aux_loss")(0, 0));
  EXPECT_NEAR(losses::router_z_loss<double>(z), c.mat("z_loss")(0, 0),
              1e-12 * c.mat("z_loss")(0, 0));
}

}  // namespace
}  // namespace moe
