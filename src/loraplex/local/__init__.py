"""A real Kubernetes cluster on one machine, for the demo, the tests and the benchmarks: the control plane
binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) and a kubelet that runs pods as
local processes."""
