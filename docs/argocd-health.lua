-- Argo CD health check for chatcluster.dev/ChatCluster.
-- Install under resource.customizations.health.chatcluster.dev_ChatCluster in argocd-cm.
-- Paused -> Suspended; Degraded condition -> Degraded; rollout or stale status -> Progressing;
-- Available and not progressing -> Healthy.
local hs = { status = "Progressing", message = "Waiting for the operator to report status" }

local annotations = obj.metadata.annotations
if annotations ~= nil and annotations["chatcluster.dev/paused"] == "true" then
  hs.status = "Suspended"
  hs.message = "Reconciliation paused (chatcluster.dev/paused)"
  return hs
end

if obj.status == nil or obj.status.conditions == nil then
  return hs
end

local conditions = {}
for _, condition in ipairs(obj.status.conditions) do
  conditions[condition.type] = condition
end

local degraded = conditions["Degraded"]
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = degraded.reason .. ": " .. degraded.message
  return hs
end

if obj.status.observedGeneration == nil or obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "Waiting for the operator to observe the latest spec"
  return hs
end

local progressing = conditions["Progressing"]
if progressing ~= nil and progressing.reason == "Paused" then
  hs.status = "Suspended"
  hs.message = progressing.message
  return hs
end
if progressing ~= nil and progressing.status == "True" then
  hs.message = progressing.reason .. ": " .. progressing.message
  return hs
end

local available = conditions["Available"]
if available ~= nil and available.status == "True" then
  hs.status = "Healthy"
  hs.message = available.message
  return hs
end
if available ~= nil then
  hs.message = available.reason .. ": " .. available.message
end
return hs
