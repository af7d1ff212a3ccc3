-- Argo CD health of a loraplex BaseModelDeployment, from the conditions loraplex writes.
hs = {}
if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for loraplex to report"
  return hs
end
if obj.status.observedGeneration ~= nil and obj.metadata.generation ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "loraplex has not yet acted on the latest spec"
  return hs
end
local conditions = {}
for _, condition in ipairs(obj.status.conditions) do
  conditions[condition.type] = condition
end
local reconciled = conditions["Reconciled"]
if reconciled ~= nil and reconciled.status == "False" then
  hs.status = "Degraded"
  hs.message = reconciled.message
  return hs
end
local ready = conditions["Ready"]
-- Adapters report their own health; a model whose replicas serve is Healthy while adapters load.
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message
  return hs
end
hs.status = "Progressing"
hs.message = (ready and ready.message) or "Progressing"
return hs
