-- Orthanc auto-routing for cxr-gateway: when a study has been quiet for StableAge seconds, send
-- its CR and DX images that were not sent before to the modality named "cxrgw".
-- Each routed instance gets the user metadata "CxrRouted", so the SR that the gateway stores
-- back into the study (and anything else already sent) is never routed again, while images
-- added to the study later are (the gateway reports them as an amendment).

local ROUTED = 'CxrRouted'
local TARGET = 'cxrgw'
local MODALITIES = { CR = true, DX = true }

function OnStableStudy(studyId, tags, metadata)
  local pending = {}
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  for _, s in ipairs(series) do
    if MODALITIES[s['MainDicomTags']['Modality'] or ''] then
      for _, instanceId in ipairs(s['Instances']) do
        local meta = ParseJson(RestApiGet('/instances/' .. instanceId .. '/metadata?expand'))
        if meta[ROUTED] == nil then
          table.insert(pending, instanceId)
        end
      end
    end
  end
  if #pending == 0 then
    return
  end
  local body = DumpJson({ Resources = pending, Synchronous = true }, true)
  local ok, err = pcall(RestApiPost, '/modalities/' .. TARGET .. '/store', body)
  if not ok then
    -- Left unmarked: the next change to the study (or a restart) routes them again.
    print('cxr-gateway routing failed for study ' .. studyId .. ': ' .. tostring(err))
    return
  end
  for _, instanceId in ipairs(pending) do
    RestApiPut('/instances/' .. instanceId .. '/metadata/' .. ROUTED, '1')
  end
end
