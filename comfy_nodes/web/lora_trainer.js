// lora-scripts in the ComfyUI frontend: what the Python nodes cannot say through their input specs.
//
// 1. A fresh Train LoRA / Strength Grid node gets "control after generate: fixed". The frontend adds
//    that widget to every INT named seed with "randomize" preselected, so every Run would change the
//    seed and retrain (an hour of GPU per click). Saved workflows keep the mode they were saved with:
//    onNodeCreated runs before a loaded node's widget values are restored.
// 2. The text a node returns in ui.text (the saved LoRA's name, steps, final loss; the captions) is
//    shown on the node in a read-only box, as ComfyUI's Preview as Text shows its text.
//    A DOM widget (LGraphNode.addDOMWidget, public) rather than ComfyWidgets, which the frontend
//    calls internal.
import { app } from "../../scripts/app.js";

const OURS = new Set(["LoraTrainerCaptionFolder", "LoraTrainerCheckDataset", "LoraTrainerTrain",
    "LoraTrainerTrainFlux", "LoraTrainerStrengthGrid", "LoraTrainerCompare"]);
const FIXED_SEED = new Set(["LoraTrainerTrain", "LoraTrainerTrainFlux", "LoraTrainerStrengthGrid", "LoraTrainerCompare"]);
const RESULT = "result";

function showText(node, message) {
    const text = message?.text;
    if (!text) return;
    let box = node.widgets?.find((w) => w.name === RESULT);
    if (!box) {
        const area = document.createElement("textarea");
        area.className = "comfy-multiline-input";
        area.readOnly = true;
        area.rows = 4;
        box = node.addDOMWidget(RESULT, "customtext", area, {
            getValue: () => area.value,
            setValue: (v) => { area.value = v; },
        });
        box.serialize = false; // not an input: never saved into the workflow or sent with a prompt
    }
    box.value = Array.isArray(text) ? text.join("\n") : String(text);
    node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
    name: "lora_scripts.nodes",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!OURS.has(nodeData.name)) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const result = onNodeCreated?.apply(this, arguments);
            if (FIXED_SEED.has(nodeData.name)) {
                const control = this.widgets?.find((w) => w.name === "control_after_generate");
                if (control) control.value = "fixed";
            }
            return result;
        };
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            showText(this, message);
        };
    },
});
