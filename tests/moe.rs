//! Mixture-of-Experts blocks: float64 finite differences of the whole objective (cross-entropy
//! plus load-balancing and z-loss) with every gate position, and the E = 1, top-1 identity with
//! the dense SwiGLU model.

mod common;
use common::{fd_check, ids, jitter_norms, tiny_cfg, B, T};
use gated_lm::config::{GateConfig, ModelConfig, MoeConfig};
use gated_lm::model::observer::{NoObserver, RouterLog};
use gated_lm::model::{shifted_targets, Batch, Model};

fn moe_cfg(gate: &str, f: impl Fn(&mut MoeConfig)) -> ModelConfig {
    let mut c = tiny_cfg(GateConfig::parse_spec(gate).unwrap());
    let mut m = MoeConfig::new(4, 2, 6);
    m.shared_expert_intermediate_size = 5;
    m.router_aux_loss_coef = 0.1;
    m.router_z_loss_coef = 0.05;
    f(&mut m);
    c.moe = Some(m);
    c
}

fn batch_run(m: &Model<f64>, obs: &mut RouterLog) -> (f64, gated_lm::model::params::ParamStore<f64>) {
    let ids = ids();
    let tg = shifted_targets(&ids, T);
    let mut g = m.zero_grads();
    let b = Batch {
        ids: &ids,
        targets: &tg,
        batch: B,
        seq: T,
    };
    let l = m.forward_backward(&b, &mut g, obs).unwrap();
    (l, g)
}

#[test]
fn moe_gradients_match_finite_differences_with_every_gate_position() {
    let cases: Vec<(&str, ModelConfig)> = vec![
        ("ungated, shared expert", moe_cfg("none", |_| {})),
        (
            "g1 elementwise, no renormalisation, no shared expert",
            moe_cfg("elementwise", |m| {
                m.norm_topk_prob = false;
                m.shared_expert_intermediate_size = 0;
            }),
        ),
        (
            "g2 headwise shared additive silu static, capacity 0.75",
            moe_cfg("g2:headwise:shared:add:silu:static", |m| m.capacity_factor = Some(0.75)),
        ),
        (
            "g3 ns-sigmoid, layer 0 dense",
            moe_cfg("g3:ns-sigmoid", |m| m.mlp_only_layers = vec![0]),
        ),
        (
            "g4 headwise, top-1 of 3",
            moe_cfg("g4:headwise", |m| {
                m.num_experts = 3;
                m.num_experts_per_tok = 1;
            }),
        ),
        (
            "g5 elementwise, sparse step 2",
            moe_cfg("g5", |m| m.decoder_sparse_step = 2),
        ),
    ];
    for (k, (what, cfg)) in cases.into_iter().enumerate() {
        // the first seed whose routing gives every expert a token: every tensor then has a
        // gradient to check (fd_check insists on it)
        let (mut m, log) = (0..50u64)
            .map(|s| {
                let mut m: Model<f64> = Model::new(cfg.clone(), 40 + 100 * k as u64 + s).unwrap();
                jitter_norms(&mut m, s);
                let mut log = RouterLog::default();
                batch_run(&m, &mut log);
                (m, log)
            })
            .find(|(_, log)| log.stats.iter().all(|st| st.load.iter().all(|&c| c > 0)))
            .expect("a seed that uses every expert");
        let moe_layers = (0..m.cfg.num_layers).filter(|&l| m.cfg.moe_at(l).is_some()).count();
        assert_eq!(log.stats.len(), moe_layers, "{what}");
        if what.contains("capacity") {
            assert!(
                log.stats.iter().any(|s| s.dropped > 0),
                "{what}: the capacity must bind"
            );
        }
        fd_check(&mut m, 4, what);
    }
}

#[test]
fn one_expert_top_one_is_the_dense_mlp_bit_for_bit() {
    for gate in ["none", "elementwise", "g2:headwise"] {
        let dense_cfg = tiny_cfg(GateConfig::parse_spec(gate).unwrap());
        let dense: Model<f64> = Model::new(dense_cfg.clone(), 7).unwrap();
        let mut cfg = dense_cfg.clone();
        let mut mc = MoeConfig::new(1, 1, dense_cfg.intermediate_size);
        mc.router_aux_loss_coef = 0.5; // constant (= 1) for a single expert: no gradient
        cfg.moe = Some(mc);
        let mut moe: Model<f64> = Model::new(cfg, 8).unwrap();
        for (i, name) in moe.params.names.clone().iter().enumerate() {
            let dense_name = name.replace("mlp.experts.0.", "mlp.");
            if let Some(t) = dense.params.get(&dense_name) {
                moe.params.tensors[i] = t.clone();
            }
        }
        let (ld, gd) = batch_run(&dense, &mut RouterLog::default());
        let mut log = RouterLog::default();
        let (lm, gm) = batch_run(&moe, &mut log);
        assert_eq!(ld.to_bits(), lm.to_bits(), "{gate}");
        assert!(log.stats.iter().all(|s| s.lb_loss == 1.0 && s.dropped == 0));
        for (i, name) in moe.params.names.iter().enumerate() {
            match dense
                .params
                .names
                .iter()
                .position(|n| *n == name.replace("mlp.experts.0.", "mlp."))
            {
                Some(j) => assert_eq!(gm.tensors[i], gd.tensors[j], "{gate}: {name}"),
                None => {
                    assert!(name.ends_with("mlp.gate.weight"), "{name}");
                    assert!(
                        gm.tensors[i].data.iter().all(|&x| x == 0.0),
                        "{gate}: router gradient must be 0"
                    );
                }
            }
        }
        let ids = ids();
        let tg = shifted_targets(&ids, T);
        let b = Batch {
            ids: &ids,
            targets: &tg,
            batch: B,
            seq: T,
        };
        let (a, c) = (
            dense.forward(&b, &mut NoObserver).unwrap().logits,
            moe.forward(&b, &mut NoObserver).unwrap().logits,
        );
        assert_eq!(a, c, "{gate}");
    }
}
