-- Argo CD health of a loraplex LoraAdapter, from the conditions loraplex writes.
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
local ready = nil
local validated = nil
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Ready" then ready = condition end
  if condition.type == "Validated" then validated = condition end
end
if obj.status.phase == "Failed" or (validated ~= nil and validated.status == "False") then
  hs.status = "Degraded"
  hs.message = (ready and ready.message) or (validated and validated.message) or "Failed"
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message
  return hs
end
if obj.status.phase == "Pending" and ready ~= nil and ready.reason == "BaseModelNotFound" then
  hs.status = "Degraded"
  hs.message = ready.message
  return hs
end
hs.status = "Progressing"
hs.message = (ready and ready.message) or obj.status.phase or "Progressing"
return hs
