//! The CLI's behaviour tests, one binary with one module per scenario. Most run the real
//! `clustermesh` binary against fake Kubernetes API servers
//! (`clustermesh_test_support::fake_kube`) or real state directories.

mod support;

mod helm_chart;
mod helm_real;
mod kind_values;
mod kube_agents;
mod kube_enable_connect;
mod kube_enable_plan;
mod kube_fake_selftest;
mod kube_mode;
mod kube_real_kubectl;
mod kube_status;
mod plain_helm_path;
mod standalone;
mod standalone_policy_views;
