"""Pensieve's Kubernetes operator (kopf): PensieveDeployment → engine pods, router,
autoscaling and monitoring. Never imports torch.

Layout: `handlers` registers the kopf handlers and nothing else; the logic is in
plain functions: `spec` (typed, validated spec), `sizing` (node-derived sizes),
`render` (child manifests), `discovery` (API versions served by the cluster),
`kube` (a thin generic REST client), `reconcile` (level-based child
reconciliation) and `status` (conditions).
"""

GROUP = "pensieve.ai"
VERSION = "v1alpha1"
PLURAL = "pensievedeployments"
KIND = "PensieveDeployment"
